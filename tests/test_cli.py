"""The diffugts command: help on every subcommand, and each subcommand doing its job."""

import json
import subprocess
import sys

import numpy as np
import pytest

from diffugts_core.cli import build_parser, main
from diffugts_core.io import load_volume

SUBCOMMANDS = ["demo", "phantoms", "evaluate", "manifests"]


@pytest.mark.parametrize("command", [[], *[[c] for c in SUBCOMMANDS]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: diffugts" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "diffugts_core.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "diffugts-core" in out.stdout


def test_every_subcommand_is_documented():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert set(SUBCOMMANDS) <= set(choices)


def test_demo_writes_case_and_montage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--shape", "64,64,32"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"liver_000_image.nii.gz", "liver_000_organs.nii.gz", "liver_000_tumor.nii.gz",
            "liver_000_montage.png"} <= names
    assert (tmp_path / "liver_000_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_volume(tmp_path / "liver_000_tumor.nii.gz").array.sum() > 0


def test_phantoms_then_evaluate_against_itself_and_a_shift(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["phantoms", "--out", str(out), "--categories", "liver,lung", "--per-category", "1",
                 "--healthy", "1", "--seed", "2", "--shape", "64,64,32", "--no-progress",
                 "--montage", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").exists()
    capsys.readouterr()
    tumor = out / "liver_000_tumor.nii.gz"
    assert main(["evaluate", "--pred", str(tumor), "--ref", str(tumor)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"][0]["dsc"] == 1.0 and report["mean"]["mean_nsd"] == 1.0

    preds = tmp_path / "preds"
    preds.mkdir()
    for kind in ("liver", "lung"):
        ref = load_volume(out / f"{kind}_000_tumor.nii.gz", dtype=np.uint8)
        from diffugts_core.io import save_volume

        save_volume(np.roll(ref.array, 1, axis=0), ref.affine, preds / f"{kind}_000_pred.nii.gz")
    refs = tmp_path / "refs"
    refs.mkdir()
    for kind in ("liver", "lung"):
        (refs / f"{kind}_000_tumor.nii.gz").write_bytes((out / f"{kind}_000_tumor.nii.gz").read_bytes())
    assert main(["evaluate", "--pred", str(preds), "--ref", str(refs), "--tolerance-mm", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["case_id"] for c in report["cases"]] == ["liver_000", "lung_000"]
    assert all(0 < c["dsc"] < 1 for c in report["cases"])
    assert all(c["nsd"] == 1.0 for c in report["cases"])  # a 5 mm shift is within 6 mm tolerance


def test_unknown_category_is_a_clean_error(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path / "x"), "--categories", "liver,stomach"]) == 2
    err = capsys.readouterr().err
    assert "stomach" in err and "choose from" in err
    assert not (tmp_path / "x").exists()


def test_manifests_list_and_missing_dataset(tmp_path, capsys):
    assert main(["manifests"]) == 0
    assert "msd_task03_liver" in capsys.readouterr().out
    assert main(["manifests", "msd_task03_liver", "--root", str(tmp_path / "absent")]) == 2
    assert "medicaldecathlon.com" in capsys.readouterr().err
