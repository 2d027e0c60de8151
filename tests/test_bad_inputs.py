"""Every case of the bad-input catalogue (tests/bad_input_cases.py): the expected exit code and message, exactly the
expected files written, every input's sha256 unchanged; and the table in docs/bad_inputs.md is the catalogue's."""

import pytest

from tests.bad_input_cases import CASES, docs_table, render_table, run_all


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(outcomes, case):
    outcome = outcomes[case.name]
    assert outcome.exit_code == case.exit_code, outcome
    kind = "error:" if case.exit_code == 2 else "warning:"
    assert outcome.first_line.startswith(kind) and case.says in outcome.first_line, outcome.first_line
    assert outcome.written == tuple(sorted(case.writes)), outcome.written
    assert outcome.inputs_unchanged


def test_docs_table_is_the_catalogue(outcomes):
    assert docs_table() == render_table(outcomes), "run: python -m tests.bad_input_cases --write-docs"


def test_output_paths_are_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from diffugts_core.data import phantoms
    from diffugts_core.cli import main
    from diffugts_core.io import save_volume
    from diffugts_core.pipeline import DiffuGTSPipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the output paths were checked")

    monkeypatch.setattr(DiffuGTSPipeline, "from_pretrained", no_model)
    case = phantoms.generate_case("liver", 0, 3000, (32, 32, 16))
    image = save_volume(case.image, case.affine, tmp_path / "x.nii.gz")
    for outputs in (["-o", str(image)], ["-o", str(tmp_path / "m.nii.gz"), "--png", str(image)],
                    ["-o", str(tmp_path / "m.nii.gz"), "--save-intermediates", str(image)]):
        assert main(["segment", str(image), "--organ", "liver", *outputs]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]
