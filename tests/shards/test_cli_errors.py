"""``python -m shards`` turns user errors into one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tests.cliutil import run_cli_cases


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards_cli")
    (tmp / "empty").mkdir()
    (tmp / "notes" / "forest").mkdir(parents=True)
    (tmp / "notes" / "forest" / "readme.txt").write_text("not an image")
    for name, text in (("badjson", "{not json"), ("nosplits", "{}")):
        (tmp / name).mkdir()
        (tmp / name / "manifest.json").write_text(text)
    cases = {
        "inspect_missing": ["inspect", str(tmp / "absent")],
        "inspect_bad_json": ["inspect", str(tmp / "badjson")],
        "inspect_not_a_manifest": ["inspect", str(tmp / "nosplits")],
        "build_no_class_folders": ["build", "--source", "folder", "--input", str(tmp / "empty"),
                                   "--output", str(tmp / "o1"), "--quiet"],
        "build_missing_input": ["build", "--source", "folder", "--input", str(tmp / "absent"),
                                "--output", str(tmp / "o2"), "--quiet"],
        "build_nothing_written": ["build", "--source", "folder", "--input", str(tmp / "notes"),
                                  "--output", str(tmp / "o3"), "--quiet"],
        "inspect_empty_shards": ["inspect", str(tmp / "o3")],  # what the build above left
        "build_bad_fraction": ["build", "--source", "synthetic", "--count", "4", "--val-fraction", "2",
                               "--output", str(tmp / "o4"), "--quiet"],
    }
    return tmp, run_cli_cases("shards", cases)


EXPECTED = {
    "inspect_missing": "error: {tmp}/absent has no manifest.json (not a shards output folder)",
    "inspect_bad_json": "error: {tmp}/badjson/manifest.json: not valid JSON "
                        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    "inspect_not_a_manifest": "error: {tmp}/nosplits/manifest.json: not a shards manifest (no 'splits' mapping)",
    "build_no_class_folders": "error: folder source: {tmp}/empty has no class sub-folders",
    "build_missing_input": "error: folder source: {tmp}/absent is not a directory",
    "build_nothing_written": "error: no samples written to {tmp}/o3: every input was skipped "
                             "(1 in all: not-an-image 1)",
    "build_bad_fraction": "error: val_fraction must be in [0, 1), got 2.0",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_user_error_is_one_line_and_exit_code_2(setup, case):
    tmp, runs = setup
    got = runs[case]
    assert "Traceback" not in got.stderr
    assert got.error_lines == [EXPECTED[case].format(tmp=tmp)]
    assert got.code == 2


def test_inspecting_shards_without_samples_fails_verification(setup):
    tmp, runs = setup
    got = runs["inspect_empty_shards"]
    assert "Traceback" not in got.stderr and got.code == 1
    assert got.stdout.splitlines()[-2:] == ["ERROR no samples in any split", "FAILED: 1 problem(s)"]
