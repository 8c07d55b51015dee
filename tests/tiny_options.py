"""`la-seg` options of the smallest model that runs end to end (28 px, a 2-block ViT), shared by tests;
a module of its own, as `conftest` names two modules. At 4 mm per pixel its 28 px hold demo.yaml's 112 mm
field of view: the tests' phantoms fit one window, as the demo's do."""

TINY_CLI = [
    "--config", "demo.yaml",
    "--data.img_size", "28",
    "--data.target_spacing", "4.0",
    "--data.num_workers", "0",
    "--model.net.backbone_kwargs", "{depth: 2, embed_dim: 24, num_heads: 2}",
    "--model.net.decoder_channels", "[8, 8, 8, 8]",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def stretched(img_size: int, **fields):
    """The model input of the tests' datasets: slices stretched to `img_size` px (their phantoms would take
    many windows at the shipped configs' mm per pixel)."""
    from la_seg.data.preprocess import InputSpec

    return InputSpec(img_size=img_size, in_plane="stretch", **fields)


def member(name: str, net, **fields):
    """An ensemble member with the tests' stretched input (see `stretched`)."""
    from la_seg.inference import EnsembleMember

    return EnsembleMember(name, net, stretched(net.config.img_size, **fields))
