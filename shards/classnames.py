"""Readable class names for folder datasets: built-in tables, mapping files, splitting."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

# EuroSAT names as in CLIP's prompts.md.
EUROSAT = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land", "Residential": "residential buildings or homes or apartments",
    "River": "river", "SeaLake": "lake or sea",
}
UCM = {
    "agricultural": "agricultural land", "airplane": "airplane", "baseballdiamond": "baseball diamond",
    "beach": "beach", "buildings": "buildings", "chaparral": "chaparral",
    "denseresidential": "dense residential area", "forest": "forest", "freeway": "freeway",
    "golfcourse": "golf course", "harbor": "harbor", "intersection": "intersection",
    "mediumresidential": "medium residential area", "mobilehomepark": "mobile home park",
    "overpass": "overpass", "parkinglot": "parking lot", "river": "river", "runway": "runway",
    "sparseresidential": "sparse residential area", "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
}
AID = {
    "Airport": "airport", "BareLand": "bare land", "BaseballField": "baseball field", "Beach": "beach",
    "Bridge": "bridge", "Center": "city center", "Church": "church", "Commercial": "commercial area",
    "DenseResidential": "dense residential area", "Desert": "desert", "Farmland": "farmland",
    "Forest": "forest", "Industrial": "industrial area", "Meadow": "meadow",
    "MediumResidential": "medium residential area", "Mountain": "mountain", "Park": "park",
    "Parking": "parking lot", "Playground": "playground", "Pond": "pond", "Port": "port",
    "RailwayStation": "railway station", "Resort": "resort", "River": "river", "School": "school",
    "SparseResidential": "sparse residential area", "Square": "square", "Stadium": "stadium",
    "StorageTanks": "storage tanks", "Viaduct": "viaduct",
}
RSSCN7 = {
    "aGrass": "grass", "bField": "farmland", "cIndustry": "industrial area",
    "dRiverLake": "river or lake", "eForest": "forest", "fResident": "residential area",
    "gParking": "parking lot",
}
TABLES: dict[str, dict[str, str]] = {"eurosat": EUROSAT, "ucm": UCM, "aid": AID, "rsscn7": RSSCN7}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def split_words(name: str) -> str:
    """Generic readable name: ``SeaLake`` -> "sea lake", ``storage_tanks`` -> "storage tanks"."""
    s = re.sub(r"[_\-.]+", " ", name)
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", s)
    return " ".join(s.lower().split())


def detect_table(folders: list[str]) -> str | None:
    """Name of the built-in table that names every folder (best overlap wins), else None."""
    norm = {_norm(f) for f in folders}
    best, best_hits = None, 0
    for name, table in TABLES.items():
        keys = {_norm(k) for k in table}
        hits = len(norm & keys)
        if norm <= keys and hits > best_hits:
            best, best_hits = name, hits
    return best


def read_mapping(path: str | Path) -> dict[str, str]:
    """Read ``{folder: readable name}`` from JSON (object) or CSV (two columns).

    Raises:
        ValueError: when the file has another shape.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object of folder -> class name")
        return {str(k): v for k, v in data.items()}
    out = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{lineno}: expected folder,classname, got {row!r}")
        out[row[0].strip()] = row[1].strip()
    return out


def resolve_classnames(
    folders: list[str], dataset: str = "auto", mapping: dict[str, str] | None = None
) -> tuple[list[str], str]:
    """Readable names for ``folders`` (same order) and where they came from.

    Priority: the user mapping, then the chosen (or detected) table, then word splitting.

    Raises:
        ValueError: for an unknown ``dataset`` or a table that lacks a folder.
    """
    if dataset not in ("auto", "none", *TABLES):
        raise ValueError(f"unknown dataset {dataset!r}; choose auto, none or one of {sorted(TABLES)}")
    table_name = detect_table(folders) if dataset == "auto" else (None if dataset == "none" else dataset)
    table = {_norm(k): v for k, v in TABLES.get(table_name or "", {}).items()}
    names, origin = [], table_name or "split-words"
    for f in folders:
        if mapping and f in mapping:
            names.append(mapping[f])
        elif table:
            if _norm(f) not in table:
                raise ValueError(f"folder {f!r} is not a {table_name} class; use --dataset none or --class-map")
            names.append(table[_norm(f)])
        else:
            names.append(split_words(f))
    if mapping:
        origin = f"mapping+{origin}"
    return names, origin
