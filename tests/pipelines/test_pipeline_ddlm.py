"""DDLMPipeline: prompt prefix, determinism, per-sample early exit, callbacks, save/load, input errors."""

import pytest
import torch

from hf_ext import DDLMPipeline, DDLMScheduler
from hf_ext.testing import tiny_ddlm

LENGTH, STEPS = 10, 12


@pytest.fixture
def pipe(tiny_tokenizer):
    pipeline = DDLMPipeline(model=tiny_ddlm(tokenizer=tiny_tokenizer), scheduler=DDLMScheduler(), tokenizer=tiny_tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _run(pipe, seed=0, **kwargs):
    kwargs = {"num_samples_per_prompt": 4, "length": LENGTH, "num_inference_steps": STEPS,
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(**kwargs)


def test_prompt_prefix_is_kept_clean(pipe, tiny_tokenizer):
    prompt_ids = tiny_tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    clean = pipe.model.embedding_matrix()[torch.tensor(prompt_ids)].detach()
    seen = []

    def record(p, i, t, kwargs):
        seen.append(kwargs["latents"][:, : len(prompt_ids)].clone())
        return {}

    out = _run(pipe, prompt="the movie was", callback_on_step_end=record)
    assert len(seen) == STEPS
    for latents in seen:
        assert torch.equal(latents, clean.expand_as(latents))
    assert (out.sequences[:, : len(prompt_ids)] == torch.tensor(prompt_ids)).all()
    assert all(text.startswith("the movie was") for text in out.texts)
    assert out.steps_used.tolist() == [STEPS] * 4


def test_deterministic_given_a_generator(pipe):
    first, second, other = _run(pipe, seed=3), _run(pipe, seed=3), _run(pipe, seed=4)
    assert torch.equal(first.sequences, second.sequences) and first.texts == second.texts
    assert not torch.equal(first.sequences, other.sequences)
    sequences, steps_used, texts = _run(pipe, seed=3, return_dict=False)
    assert texts == first.texts and torch.equal(sequences, first.sequences) and torch.equal(steps_used, first.steps_used)
    assert _run(pipe, length=None).sequences.shape == (4, 16)  # the model's max_position_embeddings


def test_full_run_matches_a_plain_euler_loop(pipe):
    """CDCD's sampler written out: warp-placed sigmas, x ~ N(0, sigma_max^2), self-conditioning, Euler steps."""
    final = []
    out = _run(pipe, num_samples_per_prompt=2, callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"].clone()) or {})
    model, E = pipe.model, pipe.model.embedding_matrix()
    sigmas = 1.0 + 9.0 * model.time_warp.inverse_cdf(torch.linspace(1, 0, STEPS + 1))
    sigmas[0], sigmas[-1] = 10.0, 1.0
    x = torch.randn(2, LENGTH, 8, generator=torch.Generator().manual_seed(0)) * 10.0
    x0 = None
    with torch.no_grad():
        for i in range(STEPS):
            logits = model.denoise(x, sigmas[i].expand(2), x0)
            x0 = logits.softmax(-1) @ E
            x = x + (sigmas[i + 1] - sigmas[i]) * ((x - x0) / sigmas[i])
    torch.testing.assert_close(final[-1], x)
    assert torch.equal(out.sequences, logits.argmax(-1))


def test_time_warp_places_the_steps(pipe):
    _run(pipe, num_samples_per_prompt=1)
    u = torch.linspace(1, 0, STEPS + 1)
    expected = 1.0 + 9.0 * pipe.model.time_warp.inverse_cdf(u)
    torch.testing.assert_close(pipe.scheduler.sigmas, expected)


def _expected_halting_steps(token_history, threshold, patience, start_fraction):
    """Plain reference of the "switches" criterion on the full run's per-step argmax tokens."""
    steps = []
    for row in range(token_history.shape[1]):
        streak = 0
        for step in range(1, token_history.shape[0]):
            share = (token_history[step, row] != token_history[step - 1, row]).float().mean().item()
            checked = step >= start_fraction * token_history.shape[0]
            streak = streak + 1 if share <= threshold and checked else 0
            if streak >= patience:
                steps.append(step + 1)
                break
        else:
            steps.append(token_history.shape[0])
    return steps


def test_early_exit_stops_per_sample_and_reports_steps(pipe):
    history = []
    full = _run(pipe, num_samples_per_prompt=6, callback_on_step_end=lambda p, i, t, kw: history.append(kw["tokens"].clone()) or {},
                callback_on_step_end_tensor_inputs=["tokens"])
    history = torch.stack(history)  # (steps, B, L)
    # pick the threshold whose reference stops samples at the most different steps
    candidates = [(t, _expected_halting_steps(history, t, patience=2, start_fraction=0.25)) for t in (0.0, 0.15, 0.25, 0.35)]
    threshold, expected = max(candidates, key=lambda c: len(set(c[1])))
    assert len(set(expected)) > 1 and min(expected) < STEPS  # the test needs samples halting at different steps

    pipe.scheduler = DDLMScheduler(switch_threshold=threshold, halting_patience=2, halting_start_fraction=0.25)
    out = _run(pipe, num_samples_per_prompt=6, early_exit="switches")
    assert out.steps_used.tolist() == expected
    for row, steps in enumerate(expected):  # a halted sample keeps the tokens of its last step
        assert torch.equal(out.sequences[row], history[steps - 1, row])
    assert torch.equal(full.steps_used, torch.full((6,), STEPS))


@pytest.mark.parametrize("criterion, start_fraction, steps", [("entropy", 0.0, 1), ("kl", 0.0, 2), ("entropy", 0.5, 7)])
def test_loose_thresholds_halt_at_the_first_checked_step(pipe, criterion, start_fraction, steps):
    pipe.scheduler = DDLMScheduler(entropy_threshold=1e9, kl_threshold=1e9, halting_patience=1,
                                   halting_start_fraction=start_fraction)
    out = _run(pipe, early_exit=criterion)
    # entropy holds at the first checked step; KL needs a previous prediction, so it first holds at the second;
    # with a start fraction of 0.5 of 12 steps, step index 6 (the 7th evaluation) is the first checked
    assert out.steps_used.tolist() == [steps] * 4


def test_callback_on_step_end(pipe):
    calls = []

    def record(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents", "halted", "steps_used"}
        calls.append((i, float(t), kwargs["steps_used"].tolist()))
        return {}

    plain = _run(pipe)
    recorded = _run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "halted", "steps_used"])
    assert torch.equal(plain.sequences, recorded.sequences)
    assert [c[0] for c in calls] == list(range(STEPS))
    assert [c[1] for c in calls] == pipe.scheduler.timesteps.tolist()
    assert [c[2] for c in calls] == [[i + 1] * 4 for i in range(STEPS)]

    # a returned "latents" replaces the pipeline's latents
    replaced = _run(pipe, callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])})
    assert not torch.equal(replaced.sequences, plain.sequences)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(pipe):
    cpu = _run(pipe, prompt="the film")
    pipe.to("cuda")
    gpu = _run(pipe, prompt="the film")  # a CPU generator: the same initial latents
    assert pipe.scheduler.sigmas.device.type == "cuda"
    assert (gpu.sequences.cpu() == cpu.sequences).float().mean() > 0.95  # argmax ties may flip across devices
    assert gpu.texts[0].startswith("the film")


def test_save_load_round_trip_with_tokenizer(pipe, tmp_path):
    pipe.scheduler = DDLMScheduler(switch_threshold=0.2, halting_patience=2, halting_start_fraction=0.25)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = DDLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert (loaded.scheduler.config.switch_threshold, loaded.scheduler.config.halting_start_fraction) == (0.2, 0.25)
    original, reloaded = pipe.model.state_dict(), loaded.model.state_dict()
    assert set(reloaded) == set(original) and all(torch.equal(original[k], v) for k, v in reloaded.items())
    for kwargs in ({}, {"prompt": "the film", "early_exit": "switches"}):
        a, b = _run(pipe, **kwargs), _run(loaded, **kwargs)
        assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts and torch.equal(a.steps_used, b.steps_used)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"length": 0}, "length"),
        ({"length": 17}, "length"),
        ({"num_samples_per_prompt": 0}, "num_samples_per_prompt"),
        ({"output_type": "np"}, r"`output_type` must be one of \('text', 'seq', 'latent'\), got 'np'"),
        ({"generator": [torch.Generator()] * 3}, "list of 3 generators, but the batch has 4 samples"),
        ({"latents": torch.zeros(4, LENGTH, 9)}, r"`latents` must have shape \(4, 10, 8\)"),
        ({"early_exit": "perplexity"}, "early_exit"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_input_raises_value_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(pipe, **kwargs)


def test_bad_prompt_type_and_mismatched_noise_range(pipe):
    with pytest.raises(TypeError, match="prompt"):
        _run(pipe, prompt=3)
    pipe.scheduler = DDLMScheduler(sigma_max=20.0)  # the model's time warp was fitted on [1, 10]
    with pytest.raises(ValueError, match=r"noise range.*\(1\.0, 20\.0\).*\(1\.0, 10\.0\)"):
        _run(pipe)


def test_tuple_return_matches_the_output_object(pipe):
    """Regression: without a tokenizer `return_dict=False` gave `(None, sequences, steps_used)`, while the output's
    `[0]` was `sequences` and its `to_tuple()` had two entries."""
    for tokenizer in (pipe.tokenizer, None):
        pipe.tokenizer = tokenizer
        out, as_tuple = _run(pipe), _run(pipe, return_dict=False)
        assert len(as_tuple) == len(out.to_tuple()) == (3 if tokenizer else 2)
        assert torch.equal(as_tuple[0], out[0]) and torch.equal(as_tuple[0], out.sequences)
        assert torch.equal(as_tuple[1], out.steps_used)


def test_over_long_prompt_is_truncated_like_a_tokenizer(pipe, tiny_tokenizer):
    """Regression: a prompt longer than `length` raised; it is cut to `length` tokens as `truncation=True` would."""
    prompt = "the movie was really great and i liked it a lot"
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5
    out = _run(pipe, prompt=prompt, length=5)
    assert out.sequences.tolist() == [ids[:5]] * 4


def test_output_types(pipe):
    final = []
    text = _run(pipe)
    seq = _run(pipe, output_type="seq")
    latent = _run(pipe, output_type="latent", callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"]) or {})
    assert torch.equal(seq.sequences, text.sequences) and seq.texts is None and len(text.texts) == 4
    assert latent.sequences is None and latent.texts is None and torch.equal(latent.steps_used, text.steps_used)
    assert latent.latents.shape == (4, LENGTH, 8) and torch.equal(latent.latents, final[-1])
    latents, steps_used = _run(pipe, output_type="latent", return_dict=False)
    assert torch.equal(latents, latent.latents) and torch.equal(steps_used, latent.steps_used)


def test_latents_argument_is_scaled_noise_with_a_clean_prefix(pipe, tiny_tokenizer):
    prompt_ids = tiny_tokenizer("the movie", add_special_tokens=False)["input_ids"]
    noise = torch.randn(4, LENGTH, 8, generator=torch.Generator().manual_seed(5))
    first = []
    given = _run(pipe, prompt="the movie", latents=noise, output_type="seq",
                 callback_on_step_end=lambda p, i, t, kw: first.append(kw["latents"].clone()) or {})
    drawn = _run(pipe, seed=5, prompt="the movie", output_type="seq")
    assert torch.equal(given.sequences, drawn.sequences)
    clean = pipe.model.embedding_matrix()[torch.tensor(prompt_ids)]
    torch.testing.assert_close(first[0][:, : len(prompt_ids)], clean.expand(4, -1, -1))


def test_a_generator_per_sample_reproduces_each_single_run(pipe):
    prompts = ["the movie", "a film was"]
    batched = pipe(prompt=prompts, length=LENGTH, num_inference_steps=STEPS,
                   generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    for row, (prompt, seed) in enumerate(zip(prompts, (3, 4), strict=True)):
        single = pipe(prompt=prompt, length=LENGTH, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batched.sequences[row], single.sequences[0]) and batched.texts[row] == single.texts[0]


def test_rows_are_prompt_major(pipe, tiny_tokenizer):
    out = _run(pipe, prompt=["the movie", "a film was"], num_samples_per_prompt=2)
    for row, prompt in enumerate(["the movie", "the movie", "a film was", "a film was"]):
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert out.sequences[row, : len(ids)].tolist() == ids
    assert not torch.equal(out.sequences[0], out.sequences[1])  # each sample its own noise


def test_progress_bar_follows_set_progress_bar_config(pipe, capsys):
    pipe.set_progress_bar_config(disable=False, desc="ddlm")
    _run(pipe)
    err = capsys.readouterr().err
    assert "ddlm: 100%" in err and f"| {STEPS}/{STEPS} [" in err
    pipe.set_progress_bar_config(disable=True)
    _run(pipe)
    assert capsys.readouterr().err == ""
