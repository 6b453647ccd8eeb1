from hf_ext.data.glue import GLUE_TASKS


def test_glue_table_matches_the_benchmark():
    # The nine GLUE tasks; STS-B is the one regression task, MNLI the one with three labels.
    assert sorted(GLUE_TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    assert {t for t, (_, n, _) in GLUE_TASKS.items() if n == 1} == {"stsb"}
    assert {t for t, (_, n, _) in GLUE_TASKS.items() if n == 3} == {"mnli"}
    assert GLUE_TASKS["mnli"][2] == "validation_matched"
    assert all(1 <= len(columns) <= 2 for columns, _, _ in GLUE_TASKS.values())
