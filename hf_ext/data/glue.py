"""What the GLUE examples need to know of each task: its text columns, label count and evaluation split.

The data itself comes from the Hub (`datasets.load_dataset("nyu-mll/glue", task)`) in the examples' real
mode; nothing here downloads.
"""

# task -> (text columns, number of labels (1 = regression), evaluation split)
GLUE_TASKS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "cola": (("sentence",), 2, "validation"),
    "sst2": (("sentence",), 2, "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, "validation"),
    "qqp": (("question1", "question2"), 2, "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "validation_matched"),
    "qnli": (("question", "sentence"), 2, "validation"),
    "rte": (("sentence1", "sentence2"), 2, "validation"),
    "wnli": (("sentence1", "sentence2"), 2, "validation"),
}

__all__ = ["GLUE_TASKS"]
