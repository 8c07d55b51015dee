"""`la-seg` options of the smallest model that runs end to end (28 px, a 2-block ViT), shared by tests;
a module of its own, as `conftest` names two modules."""

TINY_CLI = [
    "--config", "demo.yaml",
    "--data.img_size", "28",
    "--data.num_workers", "0",
    "--model.net.backbone_kwargs", "{depth: 2, embed_dim: 24, num_heads: 2}",
    "--model.net.decoder_channels", "[8, 8, 8, 8]",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
