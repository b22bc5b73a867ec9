"""Region proposers: exact boxes and areas on drawn images, labelling against a breadth-first reference, grid and
whole image, and SAM through transformers on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import importlib.util
import re
from collections import deque

import pytest
import torch

from srum.reward.proposals import (
    ConnectedComponentsProposer,
    GridProposer,
    Region,
    SamProposer,
    WholeImageProposer,
    box_nms,
    build_proposer,
    label_components,
    masks_to_regions,
    rle_to_mask,
)

RED, GREEN, BLUE, WHITE = (220, 30, 30), (30, 200, 40), (40, 60, 230), (255, 255, 255)


def canvas(height: int, width: int, colour: tuple[int, int, int] = WHITE) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8).expand(height, width, 3).clone()


def fill(image: torch.Tensor, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)


def reference_labels(foreground: torch.Tensor, pixels: torch.Tensor | None, link_tolerance: int | None):
    """Breadth-first flood fill, 8-connectivity; each component labelled by its smallest row-major index."""
    height, width = foreground.shape
    labels = torch.full((height, width), -1, dtype=torch.long)
    for start in range(height * width):
        y0, x0 = divmod(start, width)
        if not foreground[y0, x0] or labels[y0, x0] >= 0:
            continue
        labels[y0, x0] = start
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if not (0 <= ny < height and 0 <= nx < width) or not foreground[ny, nx] or labels[ny, nx] >= 0:
                        continue
                    if link_tolerance is not None and (pixels[y, x].int() - pixels[ny, nx].int()).abs().max() > \
                            link_tolerance:
                        continue
                    labels[ny, nx] = start
                    queue.append((ny, nx))
    return labels


# --- connected components --------------------------------------------------------------------------------------


def test_two_touching_rectangles_of_different_colours_are_two_regions():
    image = canvas(20, 30)
    fill(image, (2, 3, 12, 9), RED)  # 10 x 6 = 60
    fill(image, (12, 3, 20, 15), BLUE)  # touches the red one on its right edge: 8 x 12 = 96
    regions = ConnectedComponentsProposer().propose(image)
    assert regions == [Region((12, 3, 20, 15), 96), Region((2, 3, 12, 9), 60)]


def test_u_shape_is_one_region_with_its_pixel_count():
    image = canvas(16, 16)
    fill(image, (3, 2, 5, 12), GREEN)  # left arm 2 x 10
    fill(image, (11, 2, 13, 12), GREEN)  # right arm 2 x 10
    fill(image, (5, 10, 11, 12), GREEN)  # bottom bar 6 x 2
    assert ConnectedComponentsProposer().propose(image) == [Region((3, 2, 13, 12), 20 + 20 + 12)]


def test_diagonal_contact_follows_8_connectivity_and_colour():
    image = canvas(10, 10)
    fill(image, (1, 1, 4, 4), RED)
    fill(image, (4, 4, 7, 7), RED)  # touches the first square only at a corner: same colour, one region
    assert ConnectedComponentsProposer(min_area=1).propose(image) == [Region((1, 1, 7, 7), 18)]
    fill(image, (4, 4, 7, 7), BLUE)  # a different colour at the same place: two regions, raster order on ties
    assert ConnectedComponentsProposer(min_area=1).propose(image) == [Region((1, 1, 4, 4), 9), Region((4, 4, 7, 7), 9)]


def test_link_tolerance_none_joins_touching_colours():
    image = canvas(20, 30)
    fill(image, (2, 3, 12, 9), RED)
    fill(image, (12, 3, 20, 15), BLUE)
    assert ConnectedComponentsProposer(link_tolerance=None).propose(image) == [Region((2, 3, 20, 15), 156)]


def test_shape_touching_the_border_and_specks_below_min_area():
    image = canvas(24, 24)
    fill(image, (0, 10, 8, 24), RED)  # touches the left and bottom borders: 8 x 14 = 112
    fill(image, (15, 2, 17, 4), BLUE)  # a 2 x 2 speck (4 px)
    fill(image, (20, 20, 21, 21), GREEN)  # a single pixel
    assert ConnectedComponentsProposer(min_area=5).propose(image) == [Region((0, 10, 8, 24), 112)]
    assert ConnectedComponentsProposer(min_area=1).propose(image) == [
        Region((0, 10, 8, 24), 112), Region((15, 2, 17, 4), 4), Region((20, 20, 21, 21), 1)]


def test_background_is_the_most_common_border_colour():
    grey = (120, 110, 100)
    image = canvas(12, 12, grey)
    fill(image, (0, 0, 12, 2), WHITE)  # a white band along the top border: 12 + 2 + 2 border pixels
    fill(image, (4, 5, 8, 9), RED)
    proposer = ConnectedComponentsProposer(min_area=1)
    assert proposer.background_colour(image).tolist() == list(grey)
    assert proposer.propose(image) == [Region((0, 0, 12, 2), 24), Region((4, 5, 8, 9), 16)]
    explicit = ConnectedComponentsProposer(min_area=1, background=WHITE)
    assert explicit.propose(image)[0] == Region((0, 2, 12, 12), 120 - 16)  # now the grey block is the object


def test_colour_noise_within_tolerance_keeps_one_region():
    image = canvas(32, 32)
    fill(image, (5, 6, 25, 20), BLUE)
    noise = torch.randint(-10, 11, (32, 32, 3))
    noisy = (image.int() + noise).clamp(0, 255).to(torch.uint8)
    assert ConnectedComponentsProposer().propose(noisy) == [Region((5, 6, 25, 20), 280)]


def test_sorted_by_area_and_truncated_to_max_regions():
    image = canvas(40, 40)
    boxes = [(1, 1, 4, 4), (10, 1, 16, 7), (20, 1, 25, 6), (1, 20, 8, 27), (30, 30, 34, 34), (20, 20, 25, 25)]
    for box, colour in zip(boxes, [RED, GREEN, BLUE, RED, GREEN, BLUE], strict=True):
        fill(image, box, colour)
    regions = ConnectedComponentsProposer(max_regions=4, min_area=1).propose(image)
    # Areas 49, 36, 25, 25 (two 5x5 squares: raster order of their first pixel), 16 and 9 are cut.
    assert regions == [Region((1, 20, 8, 27), 49), Region((10, 1, 16, 7), 36), Region((20, 1, 25, 6), 25),
                       Region((20, 20, 25, 25), 25)]


def test_blank_image_has_no_regions():
    assert ConnectedComponentsProposer().propose(canvas(8, 8, RED)) == []


@pytest.mark.parametrize(("height", "width", "link_tolerance"), [(7, 37, None), (16, 16, 60), (1, 9, None),
                                                                    (13, 1, 60), (24, 24, 60)])
def test_labels_match_breadth_first_reference(height, width, link_tolerance):
    generator = torch.Generator().manual_seed(height * 100 + width)
    foreground = torch.rand(height, width, generator=generator) < 0.55
    pixels = torch.randint(0, 4, (height, width, 3), generator=generator) * 50  # steps of 50: some links cut
    labels = label_components(foreground, pixels, link_tolerance)
    assert torch.equal(labels, reference_labels(foreground, pixels, link_tolerance))


def test_long_serpentine_is_one_component():
    # A one-pixel-wide path about 2000 pixels long: propagation must not need one round per pixel.
    size = 63
    path = torch.zeros(size, size, dtype=torch.bool)
    path[::2] = True  # even rows
    path[1::4, -1] = True  # joined alternately at the right ...
    path[3::4, 0] = True  # ... and the left end
    labels = label_components(path)
    assert torch.equal(labels, reference_labels(path, None, None))
    assert labels[path].unique().tolist() == [0]


@pytest.mark.parametrize("bad", [torch.zeros(4, 4, 3), torch.zeros(4, 4, dtype=torch.uint8),
                                 torch.zeros(0, 4, 3, dtype=torch.uint8)])
def test_bad_images_are_refused(bad):
    with pytest.raises(ValueError, match="uint8 image"):
        ConnectedComponentsProposer().propose(bad)


# --- grid, whole image, factory ---------------------------------------------------------------------------------


def test_grid_covers_the_image_largest_cells_first():
    regions = GridProposer(rows=2, cols=3).propose(canvas(7, 10))
    # Row edges 0, 3, 7; column edges 0, 3, 6, 10: the 4-row second band and the 4-column last band are larger;
    # equal areas keep row-major order.
    assert regions == [Region((6, 3, 10, 7), 16), Region((6, 0, 10, 3), 12), Region((0, 3, 3, 7), 12),
                       Region((3, 3, 6, 7), 12), Region((0, 0, 3, 3), 9), Region((3, 0, 6, 3), 9)]
    assert sum(region.area for region in regions) == 70
    assert len(GridProposer(rows=4, cols=4, max_regions=10).propose(canvas(8, 8))) == 10
    with pytest.raises(ValueError, match="empty cells"):
        GridProposer(rows=9, cols=1).propose(canvas(8, 8))


def test_whole_image():
    assert WholeImageProposer().propose(canvas(5, 9)) == [Region((0, 0, 9, 5), 45)]
    assert WholeImageProposer().propose_batch([canvas(2, 3), canvas(4, 4)]) == [[Region((0, 0, 3, 2), 6)],
                                                                                [Region((0, 0, 4, 4), 16)]]


def test_build_proposer():
    assert isinstance(build_proposer("whole"), WholeImageProposer)
    grid = build_proposer("grid", rows=3, cols=1, max_regions=2)
    assert isinstance(grid, GridProposer) and (grid.rows, grid.cols, grid.max_regions) == (3, 1, 2)
    components = build_proposer("components", min_area=3)
    assert isinstance(components, ConnectedComponentsProposer) and components.min_area == 3
    with pytest.raises(ValueError, match="unknown region proposer 'boxes'"):
        build_proposer("boxes")
    with pytest.raises(ValueError, match="max_regions"):
        build_proposer("components", max_regions=0)


# --- masks, NMS, RLE -------------------------------------------------------------------------------------------


def test_masks_to_regions_exact_boxes_and_empty_masks_dropped():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:7] = True  # 2 x 5 = 10
    masks[2, 5, 0] = masks[2, 0, 7] = True  # two far pixels: the box spans the image, area 2
    assert masks_to_regions(masks, max_regions=10) == [Region((2, 1, 7, 3), 10), Region((0, 0, 8, 6), 2)]
    assert masks_to_regions(masks, max_regions=1) == [Region((2, 1, 7, 3), 10)]
    assert masks_to_regions(torch.zeros(0, 6, 8, dtype=torch.bool), max_regions=3) == []


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i].item()):
        if all(iou(boxes[i].tolist(), boxes[j].tolist()) <= threshold for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_box_nms_matches_greedy_reference(threshold):
    generator = torch.Generator().manual_seed(7)
    corners = torch.randint(0, 30, (40, 2, 2), generator=generator)
    boxes = torch.cat([corners.min(1).values, corners.max(1).values + 1], 1)
    scores = torch.rand(40, generator=generator)
    assert box_nms(boxes, scores, threshold).tolist() == reference_nms(boxes.float(), scores, threshold)
    if importlib.util.find_spec("torchvision") is not None:
        from torchvision.ops import nms

        assert box_nms(boxes, scores, threshold).tolist() == nms(boxes.float(), scores, threshold).tolist()


def test_rle_decoding_inverts_transformers_encoding():
    from transformers.models.sam.image_processing_pil_sam import _mask_to_rle

    masks = torch.rand(4, 9, 13) < 0.5
    masks[1] = False
    masks[2] = True
    for mask, rle in zip(masks, _mask_to_rle(masks), strict=True):
        assert torch.equal(rle_to_mask(rle), mask)


# --- SAM through transformers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    """A random SAM small enough to run in milliseconds, saved as a local transformers folder."""
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    folder = tmp_path_factory.mktemp("tiny-sam")
    # The vision default initializer_range=1e-10 gives denormal activations, 50x slower on CPU.
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8,
                             mlp_dim=64, initializer_range=0.02)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)) \
        .save_pretrained(folder)
    # The PIL backend writes the same preprocessor_config.json as the torchvision one and needs no torchvision.
    SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                         mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}) \
        .save_pretrained(folder)
    return folder


# Random weights predict poor masks: zero thresholds let them through, and NMS 1.0 keeps them all (>= 2 masks).
_PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, nms_thresh=1.0, points_per_side=4,
                   points_per_batch=8, device="cpu")


@pytest.fixture(scope="module")
def sam(tiny_sam_dir):
    return SamProposer(tiny_sam_dir, max_regions=5, **_PERMISSIVE)


def drawn_image() -> torch.Tensor:
    image = canvas(40, 48)
    fill(image, (4, 5, 20, 30), RED)
    fill(image, (26, 10, 44, 22), BLUE)
    return image


def test_sam_regions_are_the_largest_masks_of_the_pipeline(sam):
    from PIL import Image

    image = drawn_image()
    regions = sam.propose(image)
    raw = sam.pipeline(Image.fromarray(image.numpy()), **sam.call_options)
    expected = []
    for mask in raw["masks"]:
        assert mask.shape == (40, 48)
        ys, xs = mask.nonzero(as_tuple=True)
        if len(ys):
            box = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
            expected.append(Region(box, int(mask.sum())))
    assert len(expected) > sam.max_regions  # truncation is exercised
    assert regions == sorted(expected, key=lambda region: -region.area)[: sam.max_regions]
    assert [region.area for region in regions] == sorted((region.area for region in regions), reverse=True)
    for region in regions:
        x1, y1, x2, y2 = region.box
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 40 and 0 < region.area <= (x2 - x1) * (y2 - y1)


def test_sam_batch_equals_single_images(sam):
    images = [drawn_image(), canvas(24, 16, GREEN)]
    assert sam.propose_batch(images) == [sam.propose(image) for image in images]
    assert sam.propose_batch([]) == []


def test_sam_default_nms_removes_duplicates(tiny_sam_dir):
    options = {**_PERMISSIVE, "nms_thresh": 0.7}
    deduplicated = SamProposer(tiny_sam_dir, max_regions=100, **options).propose(drawn_image())
    everything = SamProposer(tiny_sam_dir, max_regions=100, **_PERMISSIVE).propose(drawn_image())
    assert 0 < len(deduplicated) < len(everything)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="the stock pipeline's NMS needs torchvision")
def test_sam_matches_the_stock_pipeline(sam, tiny_sam_dir):
    from PIL import Image
    from transformers import pipeline

    stock = pipeline("mask-generation", model=str(tiny_sam_dir), device="cpu", local_files_only=True)
    image = Image.fromarray(drawn_image().numpy())
    options = {**sam.call_options, "crops_nms_thresh": 0.7}
    ours, theirs = sam.pipeline(image, **options), stock(image, **options)
    assert len(ours["masks"]) == len(theirs["masks"])
    for mine, stock_mask in zip(ours["masks"], theirs["masks"], strict=True):
        assert torch.equal(mine, torch.as_tensor(stock_mask))


def test_sam_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"SAM model folder {tmp_path / 'nowhere'} does not exist")):
        SamProposer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json or preprocessor_config.json"):
        build_proposer("sam", model_dir=tmp_path)
