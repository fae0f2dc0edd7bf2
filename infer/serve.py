"""OpenAI-compatible HTTP server over a Furnace checkpoint, with continuous batching and a web chat page.

    python infer/serve.py --ckpt runs/sft                         # http://127.0.0.1:8000/ (page), /v1/...
    python infer/serve.py --ckpt runs/sft --port 8080 --api-key secret --max-slots 16 --max-queue 64
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=secret python -c "import openai; ..."
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (its newest checkpoint); required")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on; default: 8000")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="fp32 (default: greedy answers do not depend on the batch), bf16, int8 (fastest; its "
                        "activations are quantized per batch, so answers may depend slightly on other requests)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests; default: none (no key)")
    p.add_argument("--max-slots", type=int, default=8, help="requests decoded together in one batch; default: 8")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429; default: 64")
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: the checkpoint "
                                                       "folder's name)")
    args = p.parse_args(argv)
    for flag, v, lo in (("--port", args.port, 1), ("--max-slots", args.max_slots, 1), ("--max-queue", args.max_queue, 0)):
        if v < lo or (flag == "--port" and v > 65535):
            raise FurnaceError(f"{flag} {v}: expected an integer >= {lo}" + (" and <= 65535" if flag == "--port" else ""))

    import logging
    import uvicorn

    from infer.api import Served, create_app
    from infer.engine import Engine
    from infer.runtime import load_for_inference, set_threads
    from model.io import resolve_checkpoint

    ckpt = resolve_checkpoint(args.ckpt)   # a wrong path fails here, before the port is taken
    model_id = args.model_name or Path(args.ckpt).resolve().name
    set_threads(args.threads)

    def load() -> Served:
        model, tok, _ = load_for_inference(ckpt, args.device, args.dtype, args.tokenizer)
        return Served(Engine(model, args.max_slots, args.max_queue), tok, model_id)

    failed: list[str] = []

    def on_load_error(msg: str) -> None:
        failed.append(msg)
        server.should_exit = True

    app = create_app(load, api_key=args.api_key, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    logging.getLogger("furnace").info(f"serve: http://{args.host}:{args.port}/ (model '{model_id}'; "
                                      f"loading {ckpt}; 503 until ready)")
    server.run()
    if failed:
        raise FurnaceError(failed[0])
    if not server.started:
        raise FurnaceError(f"--host {args.host} --port {args.port}: could not listen there (in use? see above)")


if __name__ == "__main__":
    run_cli(main)
