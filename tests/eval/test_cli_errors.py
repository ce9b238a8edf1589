"""``python -m eval`` turns user errors into one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from eval import benchmark
from eval.cli import main
from tests.cliutil import run_cli_cases


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_cli")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("data: [\n")
    return {"tmp": tmp, "garbage": garbage, "bad_yaml": bad_yaml, "missing": tmp / "no_such_run"}


def _train_message(spec: str) -> str:
    """The first line of what train.api.load_model raises for ``spec`` (its wording is train's)."""
    from train.api import load_model

    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_model(spec)
    return str(e.value).splitlines()[0]


@pytest.fixture(scope="module")
def runs(files):
    out = str(files["tmp"] / "out")
    run = ["run", "--benchmark", "demo", "--max-samples", "4", "--no-progress", "--device", "cpu", "--out", out]
    cases = {
        "unknown_benchmark": ["run", "--model", "orbit-micro", "--benchmark", "no_such_benchmark", "--out", out],
        "bad_yaml": ["run", "--model", "orbit-micro", "--benchmark", str(files["bad_yaml"]), "--out", out],
        "binary_benchmark": ["run", "--model", "orbit-micro", "--benchmark", str(files["garbage"]), "--out", out],
        "out_is_a_file": ["run", "--model", "orbit-micro", "--benchmark", "demo", "--out", str(files["garbage"])],
        "batch_size": [*run, "--model", "orbit-micro", "--batch-size", "0"],
        "bad_device": ["run", "--model", "orbit-micro", "--benchmark", "demo", "--out", out, "--device", "gpu0"],
        "garbage_checkpoint": [*run, "--model", str(files["garbage"])],
        "garbage_weights": [*run, "--model", f"orbit-micro:{files['garbage']}"],
        "missing_run_dir": [*run, "--model", str(files["missing"])],
        "unknown_arch": [*run, "--model", "no-such-arch"],
    }
    return run_cli_cases("eval", cases)


@pytest.fixture(scope="module")
def expected(files) -> dict[str, str]:
    garbage, missing = files["garbage"], files["missing"]
    weights = _train_message(f"orbit-micro:{garbage}")
    return {
        "unknown_benchmark": "error: unknown benchmark 'no_such_benchmark'; "
                             f"shipped: {', '.join(benchmark.available())}",
        "bad_yaml": f"error: {files['bad_yaml']}: invalid YAML at line 2, column 1: "
                    "expected the node content, but found '<stream end>'",
        "binary_benchmark": f"error: {garbage}: not UTF-8 text (invalid start byte at byte 128)",
        "out_is_a_file": f"error: --out {garbage}: cannot create the output folder (File exists)",
        "batch_size": "error: --batch-size and --max-samples must be >= 1",
        "bad_device": "error: --device 'gpu0' is not a torch device (cpu, cuda, cuda:1, ...)",
        "garbage_checkpoint": f"error: {_train_message(str(garbage))}",
        # the wrapped torch.load text spans lines: its first line, marked as cut
        "garbage_weights": f"error: --model orbit-micro:{garbage}: {weights}",
        "missing_run_dir": f"error: {_train_message(str(missing))}",
        "unknown_arch": f"error: {_train_message('no-such-arch')}",
    }


CASES = ["unknown_benchmark", "bad_yaml", "binary_benchmark", "out_is_a_file", "batch_size", "bad_device",
         "garbage_checkpoint", "garbage_weights", "missing_run_dir", "unknown_arch"]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_exit_code_2(runs, expected, case):
    got = runs[case]
    assert "Traceback" not in got.stderr
    assert got.error_lines == [expected[case]]
    assert got.code == 2


def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--model", "x", "--benchmark", "demo", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda: CUDA is not available on this machine\n"


def test_a_model_that_cannot_load_keeps_the_others_results(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--model", str(tmp_path / "absent"), "--model", "orbit-micro", "--benchmark", "demo",
                 "--max-samples", "4", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'absent'}: no such run directory or checkpoint file\n" in err
    rows = json.loads((out / "results.json").read_text())["models"]
    assert [r["model"] for r in rows] == [str(tmp_path / "absent"), "orbit-micro"]
    failed = rows[0]["results"]["demo"]
    assert failed["status"] == "error" and failed["message"].startswith("model not loaded: ")
    assert rows[1]["results"]["demo"]["status"] == "ok"
    assert "| orbit-micro |" in (out / "results.md").read_text()
