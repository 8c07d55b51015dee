"""TensorBoard pictures: the fusion weights as a readable bar chart, and the one overlay renderer."""

from types import SimpleNamespace

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from la_seg.callbacks.images import TensorBoardImages, fusion_figure, overlay, overlay_row


def test_fusion_figure_has_one_labelled_panel_per_group_with_the_weights_as_bars():
    weights = [torch.tensor([0.1, 0.3, 0.6]), torch.tensor([0.5, 0.25, 0.25])]
    figure = fusion_figure(weights, epoch=7)
    axes = figure.get_axes()
    assert len(axes) == 2 and "epoch 7" in figure.get_suptitle()
    offsets = 0
    for ax, group in zip(axes, weights, strict=True):
        bars = ax.patches
        assert [b.get_height() for b in bars] == group.tolist()
        assert [round(b.get_x() + b.get_width() / 2) for b in bars] == list(range(offsets, offsets + 3))
        assert ax.get_xlabel() == "encoder block" and ax.get_ylabel() == "weight"
        offsets += len(group)


def test_validation_epoch_logs_the_chart_and_per_block_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    weights = [torch.softmax(torch.arange(12.0), 0)]
    trainer = SimpleNamespace(
        logger=logger, sanity_checking=False, is_global_zero=True, current_epoch=3, global_step=40
    )
    module = SimpleNamespace(net=SimpleNamespace(fusion_weights=lambda: weights))
    TensorBoardImages().on_validation_epoch_end(trainer, module)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    (chart,) = events.Images("fusion/weights")
    assert chart.width >= 300 and chart.height >= 150  # a chart, not a 20 px strip
    assert "fusion/group0/block11" in events.Tags()["scalars"]
    assert np.isclose(events.Scalars("fusion/group0/block11")[0].value, float(weights[0][11]))


def test_overlay_draws_the_reference_green_and_the_prediction_red():
    grey = torch.zeros(8, 8)
    ref = torch.zeros(8, 8, dtype=torch.bool)
    pred = torch.zeros(8, 8, dtype=torch.bool)
    ref[:4], pred[:, :4] = True, True
    picture = overlay(grey, ref, pred, size=8)
    red, green = picture[0], picture[1]
    assert (red[:, :4] > 0).all() and (red[:, 4:] == 0).all()
    assert (green[:4] > 0).all() and (green[4:] == 0).all()


def test_overlay_row_shows_the_slice_with_the_largest_reference():
    image = torch.zeros(16, 16, 5)
    image[..., 3] = 1.0
    label = torch.zeros(16, 16, 5, dtype=torch.bool)
    label[2:10, 2:10, 3] = True
    label[2:4, 2:4, 1] = True
    row = overlay_row(image, label, label)
    assert row.shape[1] * 2 == row.shape[2]
    assert row[:, :, : row.shape[1]].min() == 1.0  # the plain panel is slice 3, all ones
