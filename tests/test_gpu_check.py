"""`make gpu-check`'s CPU side: the measuring script's dry run builds the models and the CPU reference and
stops before anything touches CUDA; the served part is serve_bench's CLI with --device cuda."""
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _gpu_measure():
    spec = importlib.util.spec_from_file_location("gpu_measure", ROOT / "bench" / "gpu_measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_measure_dry_run_builds_the_models_and_stops_before_cuda(checkpoint_factory, tmp_path, capsys):
    path = tmp_path / "qwen3_moe"  # stands in for the ~1B qwen3_moe a GPU run builds (with the demo's tokenizer)
    shutil.copytree(checkpoint_factory("qwen3_moe"), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "demo" / name, path / name)
    assert _gpu_measure().main(["--dry-run", "--model", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["model_type"] == "qwen3_moe" and plan["prompts"] == 32
    assert plan["parity_cpu_tokens"] == 32 and plan["parity_prompt_ids"]
    command = plan["served_command"]
    assert command[0].endswith("bench/serve_bench.py") and command[command.index("--device") + 1] == "cuda"
    app = json.loads(command[command.index("--app") + 1])
    assert app["routers"]["num_gpus"] > 0 and app["worker"]["num_gpus"] > 0  # so both sides land on the GPU
    assert not plan["cuda_initialized"] and not torch.cuda.is_initialized()


def test_make_gpu_check_runs_the_script_and_the_script_is_valid_bash():
    make = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "bench/gpu_check.sh" in make.stdout
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "tests/cluster/test_cuda.py" in script and "bench/gpu_measure.py" in script
