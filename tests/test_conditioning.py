"""The conditioner (ensemble of embedders) and the ensemble of denoisers by noise interval."""
import pytest
import torch

from chorus.conditioning import Conditioner, Embedder, NumberEmbedder
from chorus.errors import ChorusError
from chorus.experts import Expert, ExpertEnsemble


class Fixed(Embedder):
    def __init__(self, kind, dim, value, dropout=0.0, length=3):
        super().__init__(dropout)
        self.kind, self.dim, self.value, self.length = kind, dim, value, length

    def forward(self, values):
        shape = (len(values), self.length, self.dim) if self.kind == "context" else (len(values), self.dim)
        return {self.kind: torch.full(shape, float(self.value))}

    def unconditional(self, values, negative):
        return {k: torch.full_like(v, -1.0) for k, v in self(values).items()}


def test_sequences_concatenate_on_features_vectors_and_time_ids_route_apart():
    c = Conditioner([Fixed("context", 4, 1.0), Fixed("context", 2, 2.0), Fixed("pooled", 5, 3.0),
                     NumberEmbedder("original_size", 2), NumberEmbedder("crop_top_left", 2)])
    out = c({"prompt": ["a", "b"], "original_size": [(64, 32), (16, 16)], "crop_top_left": [(0, 0), (3, 4)]})
    assert out.context.shape == (2, 3, 6) and torch.equal(out.context[0, 0], torch.tensor([1.0] * 4 + [2.0] * 2))
    assert out.pooled.shape == (2, 5)
    assert out.time_ids.tolist() == [[64, 32, 0, 0], [16, 16, 3, 4]]
    kw = out.unet_kwargs()
    assert set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


def test_per_embedder_dropout_uses_the_unconditional_embedding_of_only_that_embedder_at_its_rate():
    c = Conditioner([Fixed("context", 4, 1.0, dropout=0.5), Fixed("context", 4, 2.0, dropout=0.0)])
    out = c({"prompt": ["x"] * 4000}, dropout=True, generator=torch.Generator().manual_seed(0))
    first, second = out.context[:, 0, 0], out.context[:, 0, 4]
    assert set(first.unique().tolist()) == {-1.0, 1.0}
    assert abs((first == -1).float().mean().item() - 0.5) < 0.03
    assert (second == 2.0).all()


def test_mismatched_sequence_lengths_and_missing_inputs_are_clear_errors():
    with pytest.raises(ChorusError, match="max_length"):
        Conditioner([Fixed("context", 4, 1, length=3), Fixed("context", 4, 1, length=5)])({"prompt": ["a"]})
    with pytest.raises(ChorusError, match="original_size"):
        Conditioner([NumberEmbedder("original_size", 2)])({"prompt": ["a"]})


def test_expert_segments_follow_diffusers_cutoff_and_hand_over_on_one_sigma():
    sig = torch.linspace(10, 0, 11)
    ts = torch.linspace(999, 99, 10).round()
    ens = ExpertEnsemble([Expert("base", None, 0.0, 0.8), Expert("refiner", None, 0.8, 1.0)])
    (b, sb), (r, sr) = ens.segments(sig, ts, 1000)
    cut = round(1000 - 0.8 * 1000)
    assert len(sb) - 1 == int((ts >= cut).sum()) and sb[-1] == sr[0] and len(sb) + len(sr) - 2 == 10


def test_experts_must_cover_the_schedule():
    with pytest.raises(ChorusError, match="cover"):
        ExpertEnsemble([Expert("a", None, 0.0, 0.5), Expert("b", None, 0.6, 1.0)])


def test_ensemble_calls_each_expert_on_its_own_interval():
    calls = []
    ens = ExpertEnsemble([Expert("hi", "H", 0.0, 0.4), Expert("mid", "M", 0.4, 0.7), Expert("lo", "L", 0.7, 1.0)])

    def sampler(model, x, sigmas, **kw):
        calls.append((model, sigmas.tolist()))
        return x + 1
    sig = torch.linspace(10, 0, 11)
    ts = torch.linspace(950, 50, 10)
    x = ens.sample(sampler, lambda e: e.model, torch.zeros(1), sig, ts, 1000)
    assert [c[0] for c in calls] == ["H", "M", "L"] and x.item() == 3
    assert calls[0][1][0] == 10 and calls[-1][1][-1] == 0
