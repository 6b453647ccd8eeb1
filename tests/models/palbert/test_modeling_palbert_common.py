"""transformers' own common model tests (ModelTesterMixin, ConfigTester) run on PalbertModel and
PalbertForSequenceClassification, as transformers' tests/models/albert/test_modeling_albert.py runs them on ALBERT.

The mixins come from the transformers 5.25.0 sdist through `python tests/peer/fetch_peer_tests.py` (CI runs it);
without them this module skips, naming what is missing.

The mixin recognises a model's kind by its class name in transformers' name tables (`MODEL_MAPPING_NAMES`,
`MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`): base models are not trained, sequence classifiers get
`labels` and run `test_problem_types`. An in-tree model is listed there; ours are added for the duration of this
class (`setUpClass`), so the tests treat them as they would treat ALBERT's.

Q-exit inference drops exited examples from the batch; PALBERT honours the common conventions nonetheless:
requesting hidden states or attentions runs every step for every example (they are per pondering step, full
batch), and outputs are the same whether an example runs in a batch or alone (`test_batching_equivalence`).

Skipped common tests, each as transformers skips it for ALBERT (AlbertModelTest skips none) or for this kind
of model:
- the export tests (`test_torch_exportable = False`; they run only with RUN_SLOW=1 and transformers' own
  tests/exporters/test_export.py, which the 5.25.0 sdist lacks): eval-mode Q-exit drops exited examples from
  the batch, data-dependent control flow that torch.export cannot trace, which is why transformers sets the
  flag for models with data-dependent control flow (WavTokenizerModelTest, Qwen4ExpTextModelTest).
"""

import unittest
from unittest.mock import patch

from peer_suites import peer_module
from transformers.models.auto import modeling_auto

from hf_ext.models.palbert import PalbertConfig, PalbertForSequenceClassification, PalbertModel

common = peer_module("transformers_tests.test_modeling_common")
config_common = peer_module("transformers_tests.test_configuration_common")
ModelTesterMixin, ids_tensor, random_attention_mask = (
    common.ModelTesterMixin,
    common.ids_tensor,
    common.random_attention_mask,
)


class PalbertModelTester:
    """ALBERT's model tester (2 steps, 2 layer groups), with PALBERT's exit head."""

    def __init__(
        self,
        parent,
        batch_size=2,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_token_type_ids=True,
        use_labels=True,
        vocab_size=32,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_hidden_groups=2,
        num_attention_heads=4,
        intermediate_size=20,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=8,
        type_vocab_size=2,
        type_sequence_label_size=2,
        initializer_range=0.02,
        num_labels=3,
        lambda_head_layers=1,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_token_type_ids = use_token_type_ids
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_hidden_groups = num_hidden_groups
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.lambda_head_layers = lambda_head_layers

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_type_ids = None
        if self.use_token_type_ids:
            token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), input_ids, token_type_ids, input_mask, sequence_labels

    def get_config(self):
        return PalbertConfig(
            vocab_size=self.vocab_size,
            embedding_size=self.embedding_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range,
            num_hidden_groups=self.num_hidden_groups,
            inner_group_num=1,
            lambda_head_layers=self.lambda_head_layers,
        )

    def create_and_check_model(self, config, input_ids, token_type_ids, input_mask, sequence_labels):
        model = PalbertModel(config).eval()
        result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids)
        result = model(input_ids, token_type_ids=token_type_ids)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))
        self.parent.assertEqual(result.exit_step.shape, (self.batch_size,))
        self.parent.assertTrue(((result.exit_step >= 1) & (result.exit_step <= self.num_hidden_layers)).all())

    def create_and_check_for_sequence_classification(
        self, config, input_ids, token_type_ids, input_mask, sequence_labels
    ):
        config.num_labels = self.num_labels
        model = PalbertForSequenceClassification(config).eval()
        result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=sequence_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.exit_probs.shape, (self.batch_size, self.num_hidden_layers))
        self.parent.assertEqual(result.loss.shape, ())

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": input_mask}


class PalbertModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PalbertModel, PalbertForSequenceClassification)
    test_torch_exportable = False  # Q-exit shrinks the batch: data-dependent control flow (see the module docstring)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # What listing PALBERT in transformers' auto tables would do for an in-tree model (see the module docstring).
        for table, name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "PalbertModel"),
            (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "PalbertForSequenceClassification"),
        ):
            patcher = patch.dict(table, {PalbertConfig.model_type: name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def setUp(self):
        self.model_tester = PalbertModelTester(self)
        self.config_tester = config_common.ConfigTester(self, config_class=PalbertConfig, hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_sequence_classification(self):
        self.model_tester.create_and_check_for_sequence_classification(*self.model_tester.prepare_config_and_inputs())

