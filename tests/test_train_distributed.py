"""Stage 1 under ``accelerate launch`` with two CPU processes (DDP over gloo).

Note: accelerate 1.x's ``--cpu`` flag selects its single-process launcher, so two CPU
processes are started with ``--multi_gpu --num_processes 2`` and no visible GPU
(``CUDA_VISIBLE_DEVICES=""``): each process then runs on the CPU and the process group uses
gloo. No code of ours does anything distributed except filling the feature cache by shares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate import PartialState
    from safetensors.torch import save_file
    from train_fixtures import tiny_recipe
    from safevlm.train import TrainConfig, run_stage

    out = Path(sys.argv[1])
    recipe = tiny_recipe(out, data={"synthetic": {"dir": str(out / "synth"), "n": 60, "image_size": 32}},
                         log={"save_steps": 3, "progress_bar": False, "plot": False})
    result = run_stage(TrainConfig.from_dict(recipe))
    state = PartialState()
    save_file({k: v.contiguous() for k, v in result.model.safety_state_dict().items()},
              str(out / f"rank{state.process_index}.safetensors"))
    info = {"rank": state.process_index, "world": state.num_processes, "steps": result.global_step,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "computed": result.cache["computed"]}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(info))
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_stage1_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2] and {i["backend"] for i in infos} == {"gloo"}
    # 48 training records, batch 8 per process, 2 processes: 3 steps per epoch, 2 epochs
    assert [i["steps"] for i in infos] == [6, 6]
    # the cache fill was split: together the ranks encoded every train + val image once
    assert sum(i["computed"] for i in infos) == 48 + 6 and min(i["computed"] for i in infos) > 0

    # each checkpoint is sealed only once both ranks wrote their RNG state into it
    from safevlm.train import checkpoint as ckpt

    checkpoints = ckpt.list_checkpoints(tmp_path / "stage1")
    assert [step for step, _ in checkpoints] == [6, 3]  # save_total_limit 2
    for _, path in checkpoints:
        assert ckpt.checkpoint_problem(path) is None
        listed = set(json.loads((path / ckpt.MANIFEST_NAME).read_text())["files"])
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "safety_model.safetensors"} <= listed

    saved = load_file(str(tmp_path / "stage1" / "adapter" / "safety_model.safetensors"))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert saved.keys() == ranks[0].keys() == ranks[1].keys()
    for key, value in saved.items():
        assert torch.equal(value, ranks[0][key]) and torch.equal(value, ranks[1][key]), key
    # the adapter is a trained one, not the initialisation
    from train_fixtures import SAFETY_TEST_SIZES

    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny

    torch.manual_seed(0)
    init = SafeVLM(build_tiny("test")[0], **SAFETY_TEST_SIZES).safety_state_dict()
    assert not torch.equal(init["safety_head.type_classifier.weight"], saved["safety_head.type_classifier.weight"])
