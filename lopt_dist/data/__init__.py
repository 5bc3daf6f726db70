"""Supervised fine-tuning data: sources, row formats, tokenization with prompt masking, micro-batches."""

from lopt_dist.data.answers import extract_final_number
from lopt_dist.data.arithmetic import generate_arithmetic_rows
from lopt_dist.data.batches import MicroBatches, micro_batches
from lopt_dist.data.dataset import SFTExamples, build_examples
from lopt_dist.data.formats import FORMAT_COLUMNS, DataError, detect_format, parse_row
from lopt_dist.data.sources import load_rows, read_records
from lopt_dist.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt

__all__ = [
    "FORMAT_COLUMNS", "IGNORE_INDEX", "DataError", "MicroBatches", "SFTExamples", "build_examples", "micro_batches",
    "detect_format", "encode_example", "encode_prompt", "extract_final_number", "generate_arithmetic_rows",
    "load_rows", "parse_row", "read_records",
]
