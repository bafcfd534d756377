"""Smoke test of benchmarks/layer_step.py, model_step.py and compiler_floor.py on every backend.

Each script runs as a script (its own process, the backend set from ``--backend``) on tiny
shapes with one repetition, and the test checks the structure of what it prints: the memory
bandwidth and floor, every peer's column (or the printed reason a peer is absent), the ratio
columns, one row per shape and compilation mode. Never a time: the numbers are noise here.
PyTorch's layer and model steps run without torch.compile (compiling takes tens of seconds per
model on a CPU); compiler_floor.py, which times compiled steps only, compiles the tiny shapes.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import run_python

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
COMPILE_COLUMN = {"tensorflow": "xla", "jax": "jit", "torch": "compile"}
MODEL_COMPILE_COLUMN = {"tensorflow": "XLA", "jax": "jax.jit", "torch": "torch.compile"}
# Tiny runs: two shapes (4-D and dense), one repetition; the stem of bn_inception at 75x75.
LAYER_ARGS = ["--shapes", "8,4,4,8", "16,8", "--repeats", "1"]
MODEL_ARGS = "--image_size 75 --depth_multiplier 0.1 --final_endpoint Conv2d_1a_7x7"
MODEL_ARGS = MODEL_ARGS.split() + "--batch_size 2 --num_classes 4 --rounds 1 --steps 1".split()
# Every suite on TensorFlow; on JAX and PyTorch `renorm` runs the same step code as `bn`.
SUITES = {
    "tensorflow": ["bn", "renorm", "ghost", "fused", "masked"],
    "jax": ["bn", "masked"],
    "torch": ["bn", "masked"],
}


def _start(script, backend, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)  # the scripts set it from --backend
    return subprocess.Popen(
        [sys.executable, os.path.join(BENCHMARKS, script), "--backend", backend, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err[-4000:]}"
    )
    return out


def _tables(out):
    """The Markdown tables of `out`: lists of rows, each a list of cells."""
    tables, current = [], None
    for line in out.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not set(line) <= set("|-"):
                current.append(cells)
        else:
            current = None
    return tables


def _expected_layer_columns(backend, suite, out):
    if suite == "fused":
        return ["kernel", "xla"]
    if suite == "ghost":
        return ["keras_bn", "tf_keras" if backend == "tensorflow" else "keras_bn_plain"]
    names = ["keras_bn", "keras3"]
    if suite == "bn" and backend == "tensorflow":
        names.append("tf_keras")
    if suite == "bn" and backend == "jax":
        if "flax is not installed" in out:
            return names  # the header gives the reason (checked below)
        names.append("flax")
    if suite == "bn" and backend == "torch":
        names.append("torch.nn")
    return names


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_benchmarks_print_floor_and_every_peer(backend):
    suites = SUITES[backend]
    layer_args = [*LAYER_ARGS, "--suite", *suites]
    model_args = list(MODEL_ARGS)
    if backend == "torch":
        layer_args.append("--no-compile")
        model_args += ["--compile", "off"]
    # The scripts at once: most of their time is importing the backend.
    layer = _start("layer_step.py", backend, *layer_args)
    model = _start("model_step.py", backend, *model_args)
    floor = _start("compiler_floor.py", backend, *LAYER_ARGS)
    layer_out, model_out, floor_out = _finish(layer), _finish(model), _finish(floor)

    # layer_step.py: the bandwidth and floor of each shape, then one table per suite.
    for shape in ("8,4,4,8", "16,8"):
        assert re.search(
            rf"^memory: copy of {shape} float32 .* = [\d.]+ GB/s .* floor [\d.]+ ms$",
            layer_out,
            re.M,
        ), layer_out
    # The header says how the heap is run (kept for every column by default).
    assert re.search(r", (heap kept \(glibc mallopt|heap: the allocator's defaults)", layer_out)
    if backend == "jax" and "flax is not installed" in layer_out:
        assert re.search(r"^note: flax is not installed .*column is left out", layer_out, re.M)
    tables = _tables(layer_out)
    assert len(tables) == len(suites), layer_out
    modes = ["off"] if backend == "torch" else ["off", "on"]
    for suite, table in zip(suites, tables):
        header, *rows = table
        names = _expected_layer_columns(backend, suite, layer_out)
        assert header == [
            "suite",
            "shape",
            COMPILE_COLUMN[backend],
            "GB/s",
            "MB",
            "floor ms",
            *[f"{n} ms" for n in names],
            *[f"{n}/floor" for n in names],
            ("ours" if names[0] == "keras_bn" else names[0]) + "/best",
        ], layer_out
        assert [(r[0], r[1], r[2]) for r in rows] == [
            (suite, shape, mode) for shape in ("8,4,4,8", "16,8") for mode in modes
        ], layer_out
        for row in rows:
            assert len(row) == len(header)
            assert all(re.fullmatch(r"[\d.]+|nan", cell) for cell in row[3:]), row
    if backend == "torch":
        assert "torch.compile skipped (--no-compile)" in layer_out

    _check_compiler_floor(backend, floor_out)

    # model_step.py: ours, Keras's and the identity net, the ratio and the BN shares.
    assert "bn_inception train step" in model_out and "device " in model_out, model_out
    (table,) = _tables(model_out)
    header, *rows = table
    assert header == [
        MODEL_COMPILE_COLUMN[backend],
        "keras_bn img/s",
        "keras img/s",
        "identity img/s",
        "keras_bn/keras",
        "BN share keras_bn",
        "BN share keras",
        "first step s (keras_bn / keras / identity)",
    ], model_out
    assert [r[0] for r in rows] == (["off"] if backend == "torch" else ["off", "on"]), model_out


def _check_compiler_floor(backend, out):
    """compiler_floor.py: one row per shape, the four kernels, the sum and every implementation
    of the bn suite, each over the compiler floor."""
    names = _expected_layer_columns(backend, "bn", out)
    (table,) = _tables(out)
    header, *rows = table
    kernels = ["stats", "loss", "grad sums", "dx"]
    assert header == [
        "shape",
        "copy floor ms",
        *[f"{k} ms (GB/s)" for k in kernels],
        "compiler floor ms (/ copy floor)",
        *[f"{n} ms (/ compiler floor)" for n in names],
    ], out
    assert [r[0] for r in rows] == ["8,4,4,8", "16,8"], out
    for row in rows:
        assert re.fullmatch(r"[\d.]+", row[1]), row
        assert all(re.fullmatch(r"[\d.]+ \([\d.]+x?\)|nan \(nan\)", c) for c in row[2:]), row


def test_torch_compile_runs_each_implementation_as_one_graph():
    """layer_step.py's compiled PyTorch rows: our layer's step is one graph, as torch.nn's is.

    The row's implementations once shared one ``loss`` closure, so Dynamo's entry for Keras's
    layer (which graph-breaks) also served our call: two graphs with the output written and
    read between them. Counted with a backend that records each graph's call, not timed."""
    pytest.importorskip("torch")
    out = run_python(
        f"""
        import sys
        sys.path.insert(0, {BENCHMARKS!r})
        import torch

        calls = []

        def counting(graph, example_inputs):
            def run(*args):
                calls.append(1)
                return graph.forward(*args)

            return run

        compile_ = torch.compile
        torch.compile = lambda function, **kwargs: compile_(function, backend=counting, **kwargs)
        import devices
        import layer_step

        place = devices.placement("torch", "cpu", "test")
        steps, _ = layer_step._torch_steps("bn", (8, 4, 4, 8), True, place)
        for name, step in steps.items():
            step()  # compiles
            calls.clear()
            step()
            print(name, len(calls))
        """,
        env={"KERAS_BACKEND": "torch"},
    )
    graphs = dict(line.split() for line in out.splitlines())
    assert graphs["keras_bn"] == "1" and graphs["torch.nn"] == "1", out
    assert int(graphs["keras3"]) > 1, out  # Keras's layer graph-breaks: the case that leaked


def test_missing_device_is_one_line_error():
    """--device gpu without a GPU: one error line, exit 2 (skipped where torch sees a GPU)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = _start("layer_step.py", "torch", "--device", "gpu", "--shapes", "4,2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("layer_step.py: error: --device gpu: "), err
