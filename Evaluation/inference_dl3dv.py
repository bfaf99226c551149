#!/usr/bin/env python
"""DL3DV-2k Edit-Verify-Reason with the reference CLI (InternLM/ETCHR Evaluation/inference_dl3dv.py).

    MODEL_PATH=/models/Qwen3-VL-8B-Instruct bash launch_vllm.sh &   # 127.0.0.1:8000, "Qwen/Qwen3-VL-8B-Instruct"
    python inference_dl3dv.py --pipe_path PIPE_DIR --data_parquet_path DL3DV.parquet --result_file dl3dv.json

The reference flags keep their meaning; --config FILE and key=value overrides (evaluate.py's config,
configs/eval/*.yaml) come on top, flags winning. Differences from the reference, all switchable:
the edit keeps the aspect ratio (editor.size_mode=reference_clamp reproduces the per-side clamp),
images go as PNG (mllm.image_format=jpeg reproduces the .jpg files), the baseline is scored in the
same run (baseline=false skips it), the run resumes, and requests are concurrent.

--result_file gets the reference's rows ({"id", "result", "gt", "judge", "question", "response",
"response_judge"}, plus "status" and "score"; "id" is the row number, an integer, as in the reference,
or the parquet's id column with its type): one line appended per finished item while the run goes (by
every rank under torchrun, whole-line O_APPEND writes), then, at the end, the file is rewritten
atomically from results.jsonl in item order, one row per item. The full records, tables and report go
to <result_file stem>_run/ (run_dir=... elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate  # noqa: E402  (the Evaluation entry point next to this file)
from etchr_eval.config import ConfigError, EvalConfig, config_help, load_eval_config  # noqa: E402
from etchr_eval.fingerprint import namespace_dir  # noqa: E402
from etchr_eval.results import merge_rows, read_rows  # noqa: E402
from etchr_eval.runtime import atomic_write_text, is_main  # noqa: E402
from etchr_eval.tasks.base import DataError, read_table  # noqa: E402

ID_COLUMNS = ("id", "question_id", "qid")  # the id columns etchr_eval/tasks/dl3dv.py looks for, in its order


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_help(EvalConfig, "").lstrip())
    p.add_argument("--vllm_baseurl", default="http://127.0.0.1:8000/v1",
                   help="OpenAI base URL(s), comma-separated for several servers")
    p.add_argument("--vllm_api_key", default=None, help="API key (default: $ETCHR_MLLM_API_KEY or EMPTY)")
    p.add_argument("--model", default="Qwen/Qwen3-VL-8B-Instruct",
                   help="served model name (launch_vllm.sh's MODEL_NAME; the reference served 'qwen3')")
    p.add_argument("--result_file", default="dl3dv.json", help="results in the reference's JSONL row format")
    p.add_argument("--pipe_path", default=None, help="diffusers FLUX.2-klein pipeline dir (the editor)")
    p.add_argument("--data_parquet_path", default="DL3DV.parquet", help="DL3DV-2k parquet")
    p.add_argument("--config", default=None, help="eval YAML (configs/eval/); flags above override it")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def reference_ids(path: str, limit=None) -> dict[str, object]:
    """Item id (as the dl3dv task makes it: a string) -> the id the reference's rows carry, in item order.

    No id column: the row number, an int (the reference's `enumerate`). An integer id column: its ints.
    Any other id column: its strings."""
    df = read_table(path, [])
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    n = len(df) if limit is None else min(limit, len(df))
    if id_col is None:
        return {str(i): i for i in range(n)}
    import pandas as pd

    values = df[id_col].iloc[:n].tolist()
    if pd.api.types.is_integer_dtype(df[id_col]):
        return {str(v): int(v) for v in values}
    return {str(v): str(v) for v in values}


def reference_row(r: dict, ids: dict[str, object]) -> dict:
    """One eval row in the reference's row format (its field types: "judge" is the string "1" or "0")."""
    return {"id": ids.get(r["id"], r["id"]), "result": r.get("etchr_pred"), "gt": r.get("gt"),
            "judge": "1" if r.get("accepted") else "0", "question": r.get("question"),
            "response": r.get("etchr_response"), "response_judge": r.get("verify_response"),
            "status": r.get("status"), "score": r.get("etchr_score")}


def to_reference_rows(rows: list[dict], ids: dict[str, object]) -> list[dict]:
    return [reference_row(r, ids) for r in rows]


def _line(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


class RowAppender:
    """evaluate.run's on_row hook: one whole line per finished DL3DV item, appended as the reference does.

    One write() on an O_APPEND descriptor per row, so the lines of several ranks never interleave."""

    def __init__(self, path: Path, ids: dict[str, object]):
        self.path, self.ids, self.fd = path, ids, None

    def __call__(self, row: dict) -> None:
        if row.get("task") != "dl3dv":
            return
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = _line(reference_row(row, self.ids))
        if os.write(self.fd, line) != len(line):  # pragma: no cover - regular files write whole buffers
            raise OSError(f"{self.path}: short write")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    # The reference's flags are relative to the working directory (config paths: to the repo root).
    result_file = Path(args.result_file).absolute()
    overrides = list(args.overrides) + [
        f"mllm.endpoints=[{','.join(json.dumps(u.strip()) for u in args.vllm_baseurl.split(',') if u.strip())}]",
        f"mllm.model={json.dumps(args.model)}",
        f"tasks.dl3dv.path={json.dumps(os.path.abspath(args.data_parquet_path))}",
    ]
    if args.pipe_path:
        pipe = os.path.abspath(args.pipe_path) if os.path.exists(args.pipe_path) else args.pipe_path  # or a hub id
        overrides.append(f"editor.pipe_path={json.dumps(pipe)}")
    if not any(o.startswith("run_dir=") for o in args.overrides):
        overrides.append(f"run_dir={json.dumps(str(result_file.parent / (result_file.stem + '_run')))}")
    try:
        cfg = load_eval_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.namespace == "auto":  # its folder name is only known inside evaluate.run
        print("error: namespace=auto cannot be used with --result_file; give namespace=NAME", file=sys.stderr)
        return 2
    if args.vllm_api_key:  # into the environment, never into the saved config
        os.environ[cfg.mllm.api_key_env] = args.vllm_api_key
    if "dl3dv" not in cfg.tasks:
        print("error: --result_file needs the dl3dv task (tasks.dl3dv.path)", file=sys.stderr)
        return 2
    try:
        ids = reference_ids(cfg.tasks.dl3dv.path, cfg.tasks.dl3dv.limit)
        out_dir = namespace_dir(cfg.run_dir, cfg.namespace, {})
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    appender = RowAppender(result_file, ids)
    code = 0
    try:
        evaluate.run(cfg, on_row=appender)
    except evaluate.RunFailed as exc:  # the rows are still written, as evaluate.py writes its tables
        print(f"error: {exc}", file=sys.stderr)
        code = 3
    except evaluate.START_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        appender.close()
    if is_main():  # after rank 0 folded every rank's rows into results.jsonl
        merged = merge_rows(r for r in read_rows(out_dir / "results.jsonl") if r["task"] == "dl3dv")
        rows = [merged[f"dl3dv/{i}"] for i in ids if f"dl3dv/{i}" in merged]
        atomic_write_text(result_file, "".join(_line(r).decode("utf-8") for r in to_reference_rows(rows, ids)))
        print(f"wrote {result_file} ({len(rows)} rows)")
    return code


if __name__ == "__main__":
    sys.exit(main())
