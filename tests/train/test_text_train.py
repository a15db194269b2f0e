"""World tokenizer, contrastive text-encoder trainer and the MiniLM embedder."""
import json

import numpy as np
import pytest
import torch

from chorus.errors import ChorusError
from chorus.train import text as tt
from chorus.world.captions import HELDOUT_WORDS, PAIR_TAGS, TAGS, sample_spec

TINY = dict(hidden_size=32, layers=2, heads=2, intermediate_size=64, embed_dim=32, image_width=16, steps=30,
            batch_size=32, natural_scenes=64, twin_pairs=32, eval_scenes=16, eval_every=15, log_every=1,
            warmup_steps=3, lr=3e-3, threads=1, save_dtype="float32")


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tt.write_world_tokenizer(folder, max_length=32)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_folder):
    return tt.load_world_tokenizer(tok_folder)


def _captions(split, n, seed):
    rng = np.random.default_rng(seed)
    tags = [t for t in TAGS if split != "heldout_pairs" or t in PAIR_TAGS]
    return [sample_spec(rng, tags[i % len(tags)], split)["prompt"] for i in range(n)]


def test_training_captions_tokenize_word_by_word(tokenizer):
    vocab = set(tt.caption_vocabulary())
    for split in ("train", "heldout_pairs"):  # both use only training words
        for caption in _captions(split, 300, seed=123):
            pieces = tt.pretokenize(caption)
            ids = tokenizer(caption).input_ids
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [p + "</w>" for p in pieces], caption
            assert tt.unknown_words(caption) == [] and set(pieces) <= vocab
            assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(pieces)


def test_every_vocabulary_word_is_one_token(tokenizer):
    ranks = {m: i for i, m in enumerate(tt.learn_word_merges(tt.caption_vocabulary()))}
    for word in tt.caption_vocabulary():
        assert tt.bpe(word, ranks) == [word + "</w>"]
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert tokenizer.model_max_length == 32


def test_heldout_words_fall_back_and_are_reported(tokenizer):
    vocab = set(tt.caption_vocabulary())
    for phrase in HELDOUT_WORDS:
        assert tt.unknown_words(f"a red {phrase} circle"), phrase  # every held-out phrase has an unknown word
    for caption in _captions("heldout_words", 200, seed=7):
        ids = tokenizer(caption).input_ids
        assert all(0 <= i < len(tokenizer) for i in ids)
        unknown = tt.unknown_words(caption)
        assert unknown and not set(unknown) & vocab
    assert tt.unknown_words("a crimson orb to the west of a six-sided shape") == ["crimson", "orb", "west", "six-sided",
                                                                               "shape"]
    ids = tokenizer("naïve émoji ☃ crimson").input_ids  # any byte falls back to symbols: no crash, no unknown id
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_transformers_auto_and_classic_files_load_the_tokenizer(tokenizer, tok_folder, tmp_path):
    import shutil
    from transformers import AutoTokenizer, CLIPTokenizer
    caption = "a photo of a red circle to the left of two medium-sized blue squares"
    for cls in (CLIPTokenizer, AutoTokenizer):
        other = cls.from_pretrained(str(tok_folder))
        assert other(caption).input_ids == tokenizer(caption).input_ids and other.model_max_length == 32
    # vocab.json + merges.txt alone (the classic CLIP files, as older loaders read them) give the same ids
    (tmp_path / "classic").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_folder / name, tmp_path / "classic" / name)
    classic = CLIPTokenizer.from_pretrained(str(tmp_path / "classic"))
    assert classic(caption).input_ids == tokenizer(caption).input_ids


def test_near_duplicates_change_one_thing():
    rng = np.random.default_rng(0)
    from chorus.world.captions import HELDOUT_PAIRS
    for tag in TAGS:
        for _ in range(20):
            spec = sample_spec(rng, tag, "train")
            twin = tt.near_duplicate(spec, rng)
            if twin is None:
                continue
            assert tt.spec_key(twin) != tt.spec_key(spec)
            assert not any((r.get("color"), r["class"]) in HELDOUT_PAIRS for r in twin["include"])
            if tag == "color_attr":
                assert [r["color"] for r in twin["include"]] == [r["color"] for r in spec["include"]][::-1]
            if tag == "position":
                assert twin["include"][1]["position"][0] != spec["include"][1]["position"][0]
            assert tt.unknown_words(twin["prompt"]) == []


def test_clip_loss_identities():
    eye = torch.eye(8)
    same = torch.eye(8)
    assert float(tt.clip_loss(eye, eye, torch.tensor(np.log(100.0)), same)) < 1e-3
    flat = torch.nn.functional.normalize(torch.ones(8, 8), dim=-1)
    assert float(tt.clip_loss(flat, flat, torch.tensor(0.0), same)) == pytest.approx(np.log(8), rel=1e-5)
    # with all captions of one meaning, any alignment is right: the soft target is uniform
    assert float(tt.clip_loss(flat, flat, torch.tensor(0.0), torch.ones(8, 8))) == pytest.approx(np.log(8), rel=1e-5)


def test_twin_loss_identities():
    t = torch.eye(8)[:6]  # orthonormal: own similarity 1, twin similarity 0
    big = torch.tensor(np.log(100.0))
    assert float(tt.twin_loss(t, t, big, 3)) < 1e-6
    swapped = torch.cat([t[3:], t[:3]])  # every caption facing its twin's image
    assert float(tt.twin_loss(t, swapped, big, 3)) > float(tt.twin_loss(t, t, big, 3)) + 1.0
    flat = torch.ones(6, 8)
    assert float(tt.twin_loss(flat, flat, torch.tensor(0.0), 3)) == pytest.approx(np.log(2), rel=1e-6)
    assert float(tt.twin_loss(t, t, big, 0)) == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return tt.train_text_encoder(tt.TextTrainConfig(**TINY), out, progress=False)


def test_contrastive_training_lowers_the_loss(trained):
    rows = [json.loads(line) for line in (trained / "text_train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == TINY["steps"]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.3
    report = json.loads((trained / "text_train_report.json").read_text())
    assert set(report["eval"]) >= {"train", "heldout_pairs", "heldout_words", "twins", "paraphrase_top1"}
    assert all(r["twin"] > 0 for r in rows if "twin" in r)  # the binding term is active


def test_saved_encoder_loads_and_window_matches_tokenizer(trained):
    from transformers import CLIPTextModel
    tok = tt.load_world_tokenizer(trained / "tokenizer")
    enc = CLIPTextModel.from_pretrained(str(trained / "text_encoder")).eval()
    assert enc.config.max_position_embeddings == tok.model_max_length == 32
    assert enc.config.eos_token_id == tok.eos_token_id and enc.config.vocab_size == len(tok)
    ids = tok(["a red circle", "a blue square above a green star"], padding="max_length", max_length=32,
              return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids)
    assert out.last_hidden_state.shape == (2, 32, 32)
    eos = [r.index(tok.eos_token_id) for r in ids.tolist()]
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])


def test_world_folder_loads_whole_in_diffusers(trained, tmp_path):
    """tiny SD folder with the world tokenizer + text encoder swapped in: diffusers' pipeline encodes prompts with it."""
    import shutil
    import tiny
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel
    folder = tiny.make_sd_folder(tmp_path / "model")  # its UNet's cross_attention_dim is 32 = our hidden size
    for part in ("tokenizer", "text_encoder"):
        shutil.rmtree(folder / part)
        shutil.copytree(trained / part, folder / part)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    emb, _ = pipe.encode_prompt("two red squares", "cpu", 1, False)
    tok = tt.load_world_tokenizer(trained / "tokenizer")
    enc = CLIPTextModel.from_pretrained(str(trained / "text_encoder")).eval()
    ids = tok(["two red squares"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = enc(ids).last_hidden_state
    torch.testing.assert_close(emb.float(), ref, atol=1e-5, rtol=1e-5)


def test_bad_text_config():
    with pytest.raises(ChorusError, match="Valid fields are"):
        tt.TextTrainConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ChorusError, match="divisible"):
        tt.TextTrainConfig(hidden_size=30, heads=4)


@pytest.fixture(scope="module")
def minilm():
    return tt.minilm_embedder(max_length=32)


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm):
    out = minilm(["a red circle to the left of a blue square", "a blue square with a red disk to its left",
                  "three small yellow stars"])
    pooled, context = out["pooled"], out["context"]
    assert pooled.shape == (3, 384) and context.shape == (3, 32, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    cos = pooled @ pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.1
    assert not any(p.requires_grad for p in minilm.encoder.parameters())


def test_minilm_pooled_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tt.minilm_folder()), device="cpu", local_files_only=True)
    sentences = ["a photo of two green hearts", "an orb to the west of a lozenge"]
    ref = torch.from_numpy(model.encode(sentences, normalize_embeddings=True))
    torch.testing.assert_close(minilm(sentences)["pooled"], ref, atol=2e-5, rtol=1e-4)


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[2] / "weights" / "text-world"


@pytest.mark.skipif(not (SHIPPED / "tokenizer").is_dir(), reason="no shipped world text encoder")
def test_shipped_tokenizer_is_the_one_the_world_builds(tok_folder):
    """The vocabulary in weights/ matches what write_world_tokenizer builds from the caption grammar today."""
    for name in ("vocab.json", "merges.txt"):
        assert (SHIPPED / "tokenizer" / name).read_text() == (tok_folder / name).read_text(), name
    from transformers import CLIPTextModel
    enc = CLIPTextModel.from_pretrained(str(SHIPPED / "text_encoder"), torch_dtype=torch.float32)
    tok = tt.load_world_tokenizer(SHIPPED / "tokenizer")
    assert enc.config.vocab_size == len(tok) and enc.config.max_position_embeddings == tok.model_max_length
