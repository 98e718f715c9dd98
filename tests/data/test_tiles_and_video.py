"""MemVPDataCollator(image_grid=...) tiles every image (overview first, then row by row) and
MemVPDataCollator(num_frames=...) reads a video file or a frame list, sampled uniformly; real digit scans, a real
video file written with PyAV."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import digits, image_processor, tokenizer  # noqa: F401  (fixtures are used by name)

from memvp_peft.data import MemVPDataCollator
from memvp_peft.data.video import sample_frame_indices
from memvp_peft.tasks.digits import DigitPatchFeaturizer, digit_scan_tokens

QUESTION = "What digit is shown in the image ?"


def featurizing(tokenizer, **options):  # noqa: F811
    return MemVPDataCollator(tokenizer, DigitPatchFeaturizer(), image_input_name="image_features",
                             array_value_range=(0.0, 16.0), **options)


def record(**fields):
    return {"question": QUESTION, "answer": "seven", **fields}


def test_each_tile_is_one_cell_of_the_grid_row_by_row(tokenizer, digits):  # noqa: F811
    scans, _ = digits
    grid = np.block([[scans[0], scans[1]], [scans[2], scans[3]]])  # 16x16: one digit per tile
    batch = featurizing(tokenizer, image_grid=(2, 2))([record(image=grid)])
    assert batch["image_features"].shape == (1, 5, 16, 6) and bool(batch["image_mask"].all())
    expected = digit_scan_tokens(scans[:4])
    torch.testing.assert_close(batch["image_features"][0, 1:], expected, atol=1 / 255, rtol=0)


def test_the_overview_is_the_whole_image_downscaled(tokenizer, digits):  # noqa: F811
    scans, _ = digits
    grid = np.block([[scans[0], np.zeros((8, 8))], [np.zeros((8, 8)), np.zeros((8, 8))]])
    overview = featurizing(tokenizer, image_grid="2x2")([record(image=grid)])["image_features"][0, 0]
    pixels = overview[:, :4].reshape(4, 4, 2, 2)  # rows x cols of 2x2 patches
    top_left = pixels[:2, :2].sum()
    assert top_left > 10 * (pixels.sum() - top_left)  # the ink is in the top left quarter (bilinear blurs a little)


def test_several_images_give_blocks_per_image_and_text_only_rows_empty_blocks(tokenizer, digits):  # noqa: F811
    scans, _ = digits
    grid = np.block([[scans[0], scans[1]], [scans[2], scans[3]]])
    batch = featurizing(tokenizer, image_grid=(2, 2))([record(images=[grid, grid]), record()])
    assert batch["image_features"].shape == (2, 10, 16, 6)
    assert batch["image_mask"].tolist() == [[True] * 10, [False] * 10]


def test_tiles_of_pixel_images_follow_the_processor(tokenizer, image_processor, digits):  # noqa: F811
    scans, _ = digits
    batch = MemVPDataCollator(tokenizer, image_processor, array_value_range=(0.0, 16.0), image_grid=(1, 2))(
        [record(image=np.hstack([scans[0], scans[1]]))])
    assert batch["pixel_values"].shape == (1, 3, 3, 32, 32)


def test_the_tiles_of_a_grid_of_another_aspect_together_hold_the_whole_image(tokenizer, image_processor):  # noqa: F811
    # (1, 4) on a square image: cut as it is, each tile is a 1:4 strip and the processor (short side resized, centre
    # cropped) keeps only its middle quarter; on the padded canvas each tile is square and is kept whole
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    collator = MemVPDataCollator(tokenizer, image_processor, image_grid=(1, 4))
    tiles = collator([record(image=image)])["pixel_values"][0, 1:]  # (4, 3, 32, 32)
    side_by_side = torch.cat(list(tiles), dim=-1)  # the canvas: 128 wide, the image centred in it
    whole = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(side_by_side[..., 48:80], whole)


def test_the_overview_of_a_wide_image_keeps_its_left_and_right_edges(tokenizer, image_processor):  # noqa: F811
    image = np.zeros((16, 64), dtype=np.uint8)
    image[:, :4] = image[:, -4:] = 255  # white bands at the left and right edges
    collator = MemVPDataCollator(tokenizer, image_processor, image_grid=(1, 4))
    overview = collator([record(image=image)])["pixel_values"][0, 0, 0]  # red channel, normalised: white > 0
    assert bool((overview[:, 0] > 0).all()) and bool((overview[:, -1] > 0).all())


def test_an_image_smaller_than_the_grid_is_refused_naming_the_record(tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match=r"record 0: an image of 2x2 pixels cannot be cut into 3x3 tiles"):
        featurizing(tokenizer, image_grid=(3, 3))([record(image=np.ones((2, 2)))])


def test_segment_middles_are_sampled_and_short_videos_kept_whole():
    assert sample_frame_indices(20, 4) == [2, 7, 12, 17]
    assert sample_frame_indices(8, 8) == list(range(8))
    assert sample_frame_indices(3, 8) == [0, 1, 2]


def test_a_frame_list_is_sampled_to_num_frames(tokenizer, digits):  # noqa: F811
    scans, _ = digits
    batch = featurizing(tokenizer, num_frames=4)([record(frames=list(scans[:8]))])
    assert batch["image_features"].shape == (1, 4, 16, 6)
    torch.testing.assert_close(batch["image_features"][0], digit_scan_tokens(scans[[1, 3, 5, 7]]), atol=1 / 255,
                               rtol=0)


def test_a_short_video_fills_the_first_slots_and_masks_the_rest(tokenizer, digits):  # noqa: F811
    scans, _ = digits
    batch = featurizing(tokenizer, num_frames=4)([record(video=list(scans[:2])), record()])
    assert batch["image_mask"].tolist() == [[True, True, False, False], [False] * 4]


def write_video(path, frames: int) -> None:
    """A real MPEG-4 file: frame i is a flat grey of value 10 * i."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10 * index, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_video_file_is_decoded_and_sampled(tokenizer, tmp_path):  # noqa: F811
    write_video(tmp_path / "clip.mp4", 20)
    batch = featurizing(tokenizer, num_frames=4, image_folder=tmp_path)([record(video="clip.mp4")])
    grey = batch["image_features"][0, :, :, :4].mean(dim=(1, 2)) * 255  # DigitPatchFeaturizer: pixels in [0, 1]
    torch.testing.assert_close(grey, torch.tensor([20.0, 70.0, 120.0, 170.0]), atol=4.0, rtol=0)


def understate_avi_frame_count(path, stated: int) -> None:
    """Rewrite an AVI file's headers (the main header's dwTotalFrames, the stream header's dwLength) to state
    `stated` frames, leaving every frame in the file: a header that is wrong, as a damaged or hand-cut file's is."""
    import struct

    data = bytearray(path.read_bytes())
    main, stream = data.find(b"avih"), data.find(b"strh")
    data[main + 24:main + 28] = struct.pack("<I", stated)  # after the chunk size and 4 fields
    data[stream + 40:stream + 44] = struct.pack("<I", stated)  # after the chunk size and 8 fields
    path.write_bytes(bytes(data))


def test_frames_are_spread_over_the_decoded_video_not_its_header_count(tokenizer, tmp_path):  # noqa: F811
    av = pytest.importorskip("av")
    write_video(tmp_path / "clip.avi", 16)
    understate_avi_frame_count(tmp_path / "clip.avi", 4)
    with av.open(str(tmp_path / "clip.avi")) as container:
        assert container.streams.video[0].frames == 4  # what the header says; 16 frames decode
    batch = featurizing(tokenizer, num_frames=4, image_folder=tmp_path)([record(video="clip.avi")])
    grey = batch["image_features"][0, :, :, :4].mean(dim=(1, 2)) * 255
    torch.testing.assert_close(grey, torch.tensor([20.0, 60.0, 100.0, 140.0]), atol=4.0, rtol=0)


def test_a_missing_video_file_is_named(tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"record 0: missing video file: video file not found: .*nothing\.mp4"):
        featurizing(tokenizer, num_frames=4, image_folder=tmp_path)([record(video="nothing.mp4")])


def test_a_file_that_is_no_video_is_refused(tokenizer, tmp_path):  # noqa: F811
    pytest.importorskip("av")
    (tmp_path / "fake.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"record 0: unreadable video: cannot decode video file"):
        featurizing(tokenizer, num_frames=4, image_folder=tmp_path)([record(video="fake.mp4")])


def test_several_videos_per_record_are_refused(tokenizer, digits):  # noqa: F811
    with pytest.raises(ValueError, match=r"has \['videos'\] .* several videos per record are not read"):
        featurizing(tokenizer, num_frames=4)([record(videos=[list(digits[0][:2])])])


def test_tiles_and_frames_together_are_refused(tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match="image_grid and num_frames were both given"):
        featurizing(tokenizer, image_grid=(2, 2), num_frames=4)


@pytest.mark.parametrize("grid", [(1, 1), (0, 2), "2by2", (2, 2, 2)])
def test_a_bad_grid_is_refused(tokenizer, grid):  # noqa: F811
    with pytest.raises(ValueError, match="image_grid must be"):
        featurizing(tokenizer, image_grid=grid)
