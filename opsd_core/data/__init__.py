"""Reasoning-trace data: schema, reading, verification, dedupe, contamination, split, bundled sources."""

from opsd_core.data.bundled import (
    GSM8K100_SOURCE,
    GSM_SYMBOLIC_SOURCE,
    BundledDataError,
    generate_raw,
    gsm_symbolic_rows,
    load_gsm8k100,
)
from opsd_core.data.contamination import ContaminationIndex, word_ngrams
from opsd_core.data.dedupe import normalize_problem, problem_key
from opsd_core.data.prepare import EVAL_FILE, DataError, PrepareSummary, prepare_data, whitespace_tokens
from opsd_core.data.reader import RawLine, list_raw_files, read_jsonl, read_raw_dir
from opsd_core.data.schema import REASONS, Rejection, Trace, validate_row
from opsd_core.data.split import assign_split, split_traces
from opsd_core.data.verify import answers_match, extract_answer, normalize_answer

__all__ = [
    "EVAL_FILE", "GSM8K100_SOURCE", "GSM_SYMBOLIC_SOURCE", "REASONS",
    "BundledDataError", "ContaminationIndex", "DataError", "PrepareSummary", "RawLine", "Rejection", "Trace",
    "answers_match", "assign_split", "extract_answer", "generate_raw", "gsm_symbolic_rows", "list_raw_files",
    "load_gsm8k100", "normalize_answer", "normalize_problem", "prepare_data", "problem_key", "read_jsonl",
    "read_raw_dir", "split_traces", "validate_row", "whitespace_tokens", "word_ngrams",
]
