#!/usr/bin/env python
"""DL3DV-2k Edit-Verify-Reason with the reference CLI (InternLM/ETCHR Evaluation/inference_dl3dv.py).

    bash launch_vllm.sh            # vLLM on 127.0.0.1:10000 serving "qwen3"
    python inference_dl3dv.py --pipe_path PIPE_DIR --data_parquet_path DL3DV.parquet --result_file dl3dv.json

The reference flags keep their meaning; --config FILE and key=value overrides (evaluate.py's config,
configs/eval/*.yaml) come on top, flags winning. Differences from the reference, all switchable:
the edit keeps the aspect ratio (editor.size_mode=reference_clamp reproduces the per-side clamp),
images go as PNG (mllm.image_format=jpeg reproduces the .jpg files), the baseline is scored in the
same run (baseline=false skips it), the run resumes, and requests are concurrent.

--result_file gets the reference's row format ({"id", "result", "gt", "judge", "question", "response",
"response_judge"}); the full records, tables and report go to <result_file stem>_run/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate  # noqa: E402  (the Evaluation entry point next to this file)
from etchr_eval.config import ConfigError, load_eval_config  # noqa: E402
from etchr_eval.results import merge_rows, read_rows  # noqa: E402
from etchr_eval.runtime import atomic_write_text, is_main  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm_baseurl", default="http://127.0.0.1:10000/v1",
                   help="OpenAI base URL(s), comma-separated for several servers")
    p.add_argument("--vllm_api_key", default=None, help="API key (default: $ETCHR_MLLM_API_KEY or EMPTY)")
    p.add_argument("--model", default="qwen3", help="served model name")
    p.add_argument("--result_file", default="dl3dv.json", help="results in the reference's JSONL row format")
    p.add_argument("--pipe_path", default=None, help="diffusers FLUX.2-klein pipeline dir (the editor)")
    p.add_argument("--data_parquet_path", default="DL3DV.parquet", help="DL3DV-2k parquet")
    p.add_argument("--config", default=None, help="eval YAML (configs/eval/); flags above override it")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def to_reference_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out.append({"id": r["id"], "result": r.get("etchr_pred"), "gt": r.get("gt"),
                    "judge": "1" if r.get("accepted") else "0", "question": r.get("question"),
                    "response": r.get("etchr_response"), "response_judge": r.get("verify_response"),
                    "status": r.get("status"), "score": r.get("etchr_score")})
    return out


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    result_file = Path(args.result_file)
    overrides = list(args.overrides) + [
        f"mllm.endpoints=[{','.join(json.dumps(u.strip()) for u in args.vllm_baseurl.split(',') if u.strip())}]",
        f"mllm.model={json.dumps(args.model)}",
        f"tasks.dl3dv.path={json.dumps(args.data_parquet_path)}",
    ]
    if args.pipe_path:
        overrides.append(f"editor.pipe_path={json.dumps(args.pipe_path)}")
    if not any(o.startswith("run_dir=") for o in args.overrides):
        overrides.append(f"run_dir={json.dumps(str(result_file.parent / (result_file.stem + '_run')))}")
    try:
        cfg = load_eval_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.vllm_api_key:  # into the environment, never into the saved config
        os.environ[cfg.mllm.api_key_env] = args.vllm_api_key
    try:
        evaluate.run(cfg)
    except (ConfigError, evaluate.DataError, evaluate.EndpointError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_main():
        merged = merge_rows(read_rows(Path(cfg.run_dir) / "results.jsonl"))
        rows = [r for r in merged.values() if r["task"] == "dl3dv"]
        atomic_write_text(result_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in to_reference_rows(rows)))
        print(f"wrote {result_file} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
