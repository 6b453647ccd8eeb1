"""TRL's own DPO trainer tests, run on `TRDPOTrainer` (soft and hard rules) and, for comparison, on `DPOTrainer`.

TRL's `tests/test_dpo_trainer.py` (with `testing_utils.py` and `conftest.py`) is pinned in
`tests/peer/fetch_peer_tests.py` (SUITES["trl"]) at the commit of the local TRL snapshot and run as fetched:

    python tests/peer/fetch_peer_tests.py --source trl=/work/.mirror/huggingface+trl/repo
    python -m pytest tests/trainers/test_trdpo_trl_suite.py                  # quick: 5 tests, both rules
    python -m pytest -m slow tests/trainers/test_trdpo_trl_suite.py          # every test, soft rule
    HF_EXT_TRL_SUITE=full python -m pytest -m "" tests/trainers/test_trdpo_trl_suite.py   # + hard rule, DPOTrainer

TRL ships no tests in its sdist, so where no copy of its repository is given (CI: PyPI only) the files are absent
and this module skips, naming them (`peer_suites.peer_module`).

How the suite is run here, without editing it:

- `TestDPOTrainer` is subclassed; a fixture puts `TRDPOTrainer` and a `TRDPOConfig` factory (soft: α = 0.6; hard:
  τ = 2, so that a 9-step test updates 4 times) under the names `DPOTrainer` / `DPOConfig` that the module's tests
  use. The `DPOTrainer` variant keeps TRL's classes, to tell our failures from the version gap below.
- The Hub ids the tests load (`trl-internal-testing/tiny-*` models, the `zen`, `harmony` and `toolcall` datasets)
  are served offline by `trl_offline_hub`: tiny models of the same architectures built in code and laid out as
  the Hub cache lays them out, datasets in TRL's formats from local parquet files.
- TRL's `force_use_cpu_without_accelerator` and `cleanup_gpu` fixtures (its conftest.py) are used as TRL uses them.
- Version gap: the pinned files are TRL 1.10.0.dev0's, the installed TRL is 1.16.0. Its `testing_utils.py` imports
  `trl.import_utils.is_joblib_available`, which 1.16 dropped; it is added back (same meaning: joblib importable,
  used only by `require_sklearn`) before the import.

Outcomes other than a pass, for every trainer variant unless said otherwise (92 cases per variant):

- skipped by TRL's own markers (8): `test_train_with_liger`, `test_train_with_liger_kernel_and_peft`,
  `test_liger_kernel_with_peft_lm_head_raises`, `test_liger_kernel_with_peft_prompt_learning_raises`,
  `test_init_fails_with_moe_aux_loss_and_liger`, `test_init_fails_with_compute_metrics_and_liger` (liger-kernel is
  not installed), `test_peft_with_quantization` (bitsandbytes), `test_train_padding_free` (FlashAttention needs an
  Ampere GPU).
- refused up front (TRDPOTrainer only, 15; xfail with `RefusedUpFront`, strict): every case with
  `precompute_ref_log_probs=True` (reference log-probs computed once contradict a moving reference) and
  `test_train_with_sync_ref_model` (`sync_ref_model=True` is TRL's own reference update, which would run beside
  TR-DPO's). `TRDPOConfig` raises a ValueError naming the option before any work.
- `test_train_with_explicit_ref_model` (TRDPOTrainer only; xfail, strict): it asserts that the reference did not
  change during training, which is the opposite of TR-DPO.
- VERSION_GAP below (all variants; xfail, strict): cases that fail for `DPOTrainer` itself because the tests are
  TRL 1.10.0.dev0's and the installed TRL / PEFT behave differently.
- `TestDPOTrainerVLM` and the collator tests are not run: the collators are TRL's own (no trainer involved), and
  the VLM tests need the Hub's tiny vision-language processors (image processor, multimodal chat template), which
  have no offline stand-in here.

Last full run (HF_EXT_TRL_SUITE=full, TRL 1.16.0, transformers 5.25.0, peft 0.21.2, CPU): DPOTrainer 83 passed,
8 skipped, 1 xfailed (version gap); TRDPOTrainer soft and hard each 67 passed, 8 skipped, 17 xfailed (15 refused,
the frozen-reference assertion, the version gap).
"""

import importlib.util
import logging
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
from peer_suites import peer_module
from trl import import_utils as trl_import_utils

from hf_ext.trainers.trdpo import TRDPOConfig, TRDPOTrainer

if not hasattr(trl_import_utils, "is_joblib_available"):  # dropped after TRL 1.10; see the module docstring
    trl_import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None

dpo = peer_module("trl_tests.test_dpo_trainer")
import trl_tests.conftest as trl_conftest  # noqa: E402
from trl_tests.conftest import cleanup_gpu, force_use_cpu_without_accelerator  # noqa: E402,F401  (TRL's fixtures)

# Importing TRL's conftest filters transformers' "LOAD REPORT" warnings out of three loggers for the whole process;
# transformers' own common tests (tests/models) assert on that report. Keep the filters to TRL's tests, as in TRL.
_LOAD_REPORT_FILTERS = [
    (logger, f)
    for logger in map(logging.getLogger, ("transformers.modeling_utils", "transformers.modeling_layers", "transformers.integrations.peft"))
    for f in logger.filters
    if isinstance(f, trl_conftest._DropLoadReport)
]
for _logger, _filter in _LOAD_REPORT_FILTERS:
    _logger.removeFilter(_filter)

sys.path.insert(0, str(Path(__file__).parent))  # this folder's helper modules (pytest runs with importlib mode)
from trl_offline_hub import build_offline_hub, offline_load_dataset  # noqa: E402

# TRL 1.16's DPO loss switches activation checkpointing off around the reference forward at every step
# (trl/models/utils.py, `disable_gradient_checkpointing`) through `model.is_gradient_checkpointing` and
# `gradient_checkpointing_disable/enable`, which transformers 5.25 deprecates: TRL's code, for DPOTrainer as for ours.
# TRL 1.16 also deprecates the logits its own evaluation loop passes to `compute_metrics` (test_train_with_compute_metrics).
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`(is_gradient_checkpointing|gradient_checkpointing_disable|gradient_checkpointing_enable)` is "
        "deprecated:FutureWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated:FutureWarning"
    ),
]

RULES = {"DPOTrainer": None, "TRDPO-soft": {"ref_update": "soft"}, "TRDPO-hard": {"ref_update": "hard", "tau": 2}}

# The quick part (the default run): one case per kind of policy and reference, both rules. The rest is slow.
QUICK = {
    "test_train_model_dtype",  # model id with model_init_kwargs: the reference is loaded like the policy
    "test_train_moe_with_peft_config",  # LoRA on MoE expert parameters (target_parameters)
    "test_train_peft_model",  # a PeftModel: TRL's "ref" adapter is replaced by the moving one
    "test_tag_added",  # no args: the default TRDPOConfig
    "test_train_with_sync_ref_model",  # refused up front
}

VERSION_GAP = {
    "test_train_moe_peft_model": (
        "asserts that no 'ref' adapter is added to a PeftModel with `target_parameters`, which holds for "
        "peft<0.20 only; TRL 1.16 with peft 0.21 adds it (and so does TR-DPO, whose reference it is)"
    ),
}


class RefusedUpFront(Exception):
    """`TRDPOConfig` refused an option that contradicts a moving reference, naming it (not a ValueError, so that the
    suite's own `pytest.raises(ValueError)` blocks do not swallow it)."""


_REFUSED_OPTIONS = ("precompute_ref_log_probs", "sync_ref_model")
_REFUSED = {
    "test_evaluate_with_eval_dataset": lambda params: params["precompute_ref_log_probs"],
    "test_evaluate_precompute_ref_log_probs_after_training_raises": lambda params: True,
    "test_evaluate_precompute_ref_log_probs_at_init_after_training": lambda params: True,
    "test_precompute_ref_log_probs_raises_for_iterable_dataset": lambda params: True,
    "test_train_with_sync_ref_model": lambda params: True,
}
# Tests that set the deprecated `gradient_checkpointing` themselves (TRL's test code, not ours)
_OLD_CHECKPOINTING_NAME = {
    "test_train_with_gradient_checkpointing",
    "test_train_with_peft_config_and_gradient_checkpointing",
}


def _trdpo_config(rule: dict):
    def make(*args, **kwargs):
        try:
            return TRDPOConfig(*args, **{**rule, **kwargs})
        except ValueError as error:
            if any(kwargs.get(option) and f"`{option}=True`" in str(error) for option in _REFUSED_OPTIONS):
                raise RefusedUpFront(str(error)) from error
            raise

    return make


def _variants(test_name: str) -> list:
    """Quick tests: both rules, not slow. Others: slow, the soft rule. HF_EXT_TRL_SUITE=full adds the remaining
    variants of every test, slow."""
    quick = ["TRDPO-soft", "TRDPO-hard"] if test_name in QUICK else []
    names = RULES if os.environ.get("HF_EXT_TRL_SUITE") == "full" else ["TRDPO-soft"]
    slow = [name for name in names if name not in quick]
    return [pytest.param(name, id=name) for name in quick] + [
        pytest.param(name, marks=pytest.mark.slow, id=name) for name in slow
    ]


def pytest_generate_tests(metafunc):
    if "trainer_under_test" in metafunc.fixturenames:
        metafunc.parametrize("trainer_under_test", _variants(metafunc.function.__name__))


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    return build_offline_hub(tmp_path_factory.mktemp("trl-offline-hub"))


@pytest.fixture(autouse=True)
def _trl_load_report_filters():
    for logger, f in _LOAD_REPORT_FILTERS:
        logger.addFilter(f)
    yield
    for logger, f in _LOAD_REPORT_FILTERS:
        logger.removeFilter(f)


class TestDPOTrainerOnTRDPO(dpo.TestDPOTrainer):
    @pytest.fixture(autouse=True)
    def _substitute(self, request, trainer_under_test, offline_hub, monkeypatch, tmp_path):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(offline_hub / "hub"))
        monkeypatch.setattr(dpo, "load_dataset", partial(offline_load_dataset, offline_hub))
        monkeypatch.chdir(tmp_path)  # the default config's output_dir is relative
        name, params = request.node.originalname, getattr(request.node, "callspec", None)
        params = params.params if params else {}
        if name in VERSION_GAP:
            request.applymarker(pytest.mark.xfail(reason=f"version gap: {VERSION_GAP[name]}", strict=True))
        rule = RULES[trainer_under_test]
        if rule is None or name in _OLD_CHECKPOINTING_NAME:  # DPOConfig's default uses the deprecated name
            # (a filter set here lasts for this test: pytest restores the warning filters after each test)
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        if rule is None:
            return
        monkeypatch.setattr(dpo, "DPOTrainer", TRDPOTrainer)
        monkeypatch.setattr(dpo, "DPOConfig", _trdpo_config(rule))
        if name in _REFUSED and _REFUSED[name](params):
            request.applymarker(
                pytest.mark.xfail(
                    raises=RefusedUpFront, strict=True, reason="refused up front: contradicts a moving reference"
                )
            )
        if name == "test_train_with_explicit_ref_model":
            request.applymarker(
                pytest.mark.xfail(
                    raises=AssertionError, strict=True, reason="asserts a frozen reference; TR-DPO moves it by design"
                )
            )
