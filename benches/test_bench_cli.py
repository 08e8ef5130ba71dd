"""``deepseek-rs bench``: every benchmark listed with its line, each with its own --help."""

import pytest
from deepseek_rs.cli import BENCHMARKS, main

NAMES = ("moe", "attention", "batching", "filter", "quant", "gvrt", "uss", "gpu")


def test_every_benchmark_goes_through_the_registry():
    assert tuple(BENCHMARKS) == NAMES


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for name in NAMES:
        assert f" {name} " in out, out
    for line in BENCHMARKS.values():
        assert " ".join(line.split()) in out, line


@pytest.mark.parametrize("name", NAMES)
def test_each_benchmark_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: deepseek-rs bench {name}") and "--quick" in out, out


def test_an_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "uss", "--no-such-option"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    from deepseek_rs.bench import uss

    def needs_sklearn(argv):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(uss, "main", needs_sklearn)
    assert main(["bench", "uss", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "deepseek-rs bench uss needs sklearn" in err and "pip install 'deepseek-rs[bench]'" in err, err
