"""`qlora-kit serve --engine vllm`: the same runs handed to vLLM's own OpenAI server.

vLLM loads the base itself and every adapter as a LoRA module, so qlora-kit only checks that the
runs can be served together that way (one base, one chat template, no whole trained modules)
and writes the command line. The API key travels in the environment, never in argv.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..errors import UserError
from ..run import open_run
from .request import BASE

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank accepts only these


@dataclass
class RunInfo:
    name: str
    run_dir: Path
    adapter_dir: Path
    base_model: str
    base_model_path: str
    rank: int
    modules_to_save: list[str]
    chat_template: str | None = None


def _template(tok_dir: Path) -> str | None:
    f = tok_dir / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = tok_dir / "tokenizer_config.json"
    return json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None


def run_infos(runs: dict[str, Path]) -> list[RunInfo]:
    out = []
    for name, p in runs.items():
        r = open_run(p)  # RUN, or RUN/checkpoints/checkpoint-N with its adapter
        p, adir, info = r.dir, r.adapter, r.info
        cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
        out.append(RunInfo(name, p, adir, info.base_model, info.base_model_path, int(cfg.get("r") or 8),
                           list(cfg.get("modules_to_save") or []), _template(p / rundir.TOKENIZER)))
    return out




def vllm_command(runs_info: list[RunInfo], host: str, port: int, api_key: str | None) -> list[str]:
    """argv for vLLM's OpenAI server: the runs' shared base, each adapter as a LoRA module.

    `api_key` never goes into argv (any local user can read a process's argv): `vllm_env(api_key)`
    passes it as VLLM_API_KEY, which vLLM's server reads like --api-key."""
    if not runs_info:
        raise UserError("nothing to serve", "pass one or more run directories")
    first = runs_info[0]
    for r in runs_info:
        if r.base_model_path != first.base_model_path:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) was trained on {r.base_model}, not on {first.base_model}",
                            "adapters served together must share their base model")
        if r.chat_template != first.chat_template:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) was trained with another chat template than "
                            f"'{first.name}', and vLLM renders every adapter with one",
                            "serve them with --engine hf (each adapter keeps its template), or separately")
        if r.modules_to_save:
            raise UserError(f"adapter '{r.name}' ({r.run_dir}) also trains whole modules ({', '.join(r.modules_to_save)}), "
                            "which vLLM's LoRA support cannot load", "serve it with --engine hf, or merge it first")
    rank = max(r.rank for r in runs_info)
    max_rank = next((x for x in VLLM_RANKS if x >= rank), rank)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", first.base_model_path, "--served-model-name", BASE,
            # every run stores the tokenizer with the exact template it was trained with
            "--tokenizer", str(first.run_dir / rundir.TOKENIZER),
            # the adapters were trained against the NF4-quantized base, not the bf16 original
            "--quantization", "bitsandbytes",
            "--host", host, "--port", str(port),
            "--enable-lora", "--max-loras", str(len(runs_info)), "--max-lora-rank", str(max_rank),
            "--lora-modules", *[f"{r.name}={r.adapter_dir}" for r in runs_info]]
    return argv


def vllm_env(api_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def _check_vllm() -> None:
    hint = "pip install vllm (Linux with an NVIDIA GPU), or use --engine hf"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # any failure to import means it cannot run here
        raise UserError(f"--engine vllm needs vLLM on a CUDA machine (import vllm failed: {e})", hint) from e
    import torch

    if not torch.cuda.is_available():
        raise UserError("--engine vllm needs vLLM on a CUDA machine (no CUDA device found)", hint)



def command_line(named: dict[str, Path], host: str, port: int, api_key: str | None, grants) -> list[str]:
    """argv for the runs {model id: run dir}, after the checks qlora-kit's own engine would make:
    vLLM importable with CUDA, the base refused unless `grants` allow what loading it needs."""
    _check_vllm()
    infos = run_infos(named)
    if infos:  # vLLM loads the base itself: the same refusals first, in qlora-kit's words
        from ..model import refuse_unsafe

        refuse_unsafe(infos[0].base_model_path, grants.trust_remote_code, grants.allow_pickle)
    return vllm_command(infos, host, port, api_key) + ["--trust-remote-code"] * grants.trust_remote_code
