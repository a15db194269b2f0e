"""The Shapes world: a procedural renderer of coloured shapes with compositional captions.

`scene` (vocabulary and data types), `captions` (grammar, GenEval specs, held-out splits),
`render` (images with ground truth and SDXL's size/crop metadata), `conditions` (ControlNet
conditions: Canny edges, layout maps, masks), `formats` (image folders and WebDataset shards,
writers and streaming loaders), `cli` (`chorus world make|show|render`). The evaluator and
GenEval scoring live in `evaluator` and `scoring`.
"""
from chorus.world.scene import COLORS, SHAPES, SIZES, Sample, WorldObject

__all__ = ["COLORS", "SHAPES", "SIZES", "Sample", "WorldObject", "make_sample", "render_spec", "sample_spec"]


def __getattr__(name):  # lazy, so `import chorus.world.scene` stays light
    if name in ("make_sample", "render_spec", "random_scene_sample"):
        from chorus.world import render
        return getattr(render, name)
    if name in ("sample_spec", "TAGS"):
        from chorus.world import captions
        return getattr(captions, name)
    raise AttributeError(name)
