"""The `leanserve` command's dispatch: the lazy subcommand table, each subcommand's own parser, and a
gateway-only install (no torch, transformers or vLLM) that still runs `--help` and refuses engine-side
subcommands in one line."""
import subprocess
import sys
import textwrap

import pytest

from server import cli

# Runs the CLI in a fresh interpreter where the engine-side packages cannot be imported.
NO_ENGINE = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "vllm", "safetensors", "triton"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    from server.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_without_engine(*args):
    return subprocess.run([sys.executable, "-c", NO_ENGINE, *args], capture_output=True, text=True, timeout=120)


def test_every_table_entry_resolves_to_a_parser_and_a_main():
    for table in (cli.COMMANDS, cli.EVALUATIONS):
        for name, c in table.items():
            assert callable(cli._load(c.arguments)) and callable(cli._load(c.main)), name


def test_gateway_only_install_runs_help_and_lists_every_subcommand():
    r = run_without_engine("--help")
    assert r.returncode == 0, r.stderr
    for name in [*cli.COMMANDS, "serve", "eval"]:
        assert name in r.stdout
    r = run_without_engine("eval", "--help")
    assert r.returncode == 0 and all(name in r.stdout for name in cli.EVALUATIONS)
    r = run_without_engine("serve", "--help")
    assert r.returncode == 0 and "LEANSERVE_PORT" in r.stdout


@pytest.mark.parametrize("argv", [["prune", "a", "b", "--method", "magnitude"], ["eval", "ppl", "m"],
                                  ["prune", "--help"]])
def test_gateway_only_install_refuses_engine_subcommands_in_one_line(argv):
    r = run_without_engine(*argv)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"leanserve {' '.join(argv[:2]) if argv[0] == 'eval' else argv[0]}: needs the engine side")
    assert "pip install 'leanserve[engine-cpu]'" in line


def test_gateway_side_evaluation_runs_without_engine(tmp_path):
    traces = tmp_path / "t.jsonl"
    traces.write_text('{"id": "x", "benchmark": "math500", "response": "<|begin_of_thought|>So the answer is 4.'
                      '<|end_of_thought|>\\\\boxed{4}", "gold_answer": "4", "correct": true}\n')
    r = run_without_engine("eval", "trim", "--traces", str(traces), "--consistency", "1")
    assert r.returncode == 0, r.stderr
    assert "| 1 | math500 |" in r.stdout


def test_subcommand_parser_errors_name_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "trim", "--consistency", "x"])
    assert e.value.code == 2 and "leanserve eval trim: error" in capsys.readouterr().err


def test_unknown_evaluation_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "nothing"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
