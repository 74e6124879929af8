"""The model card's picture: frames of streams laid out a row per weights, a column per second.

pytest tests/launch/test_stream_strip.py
"""

import numpy as np

from launch.stream_strip import GAP, main, strip


def test_rows_are_weights_and_columns_are_seconds():
    red, blue = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    image = np.asarray(strip([[red, blue], [blue, red]], scale=2))
    assert image.shape == (2 * 8 + GAP, 2 * 8 + GAP, 3)
    assert (image[:8, :8] == [255, 0, 0]).all() and (image[:8, 8 + GAP :] == [0, 0, 255]).all()
    assert (image[8 + GAP :, :8] == [0, 0, 255]).all() and (image[8 : GAP + 8] == 255).all()


def test_a_missing_weights_folder_is_one_line(tmp_path, capsys):
    assert main(["--weights", str(tmp_path / "nope"), "--seconds", "0", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: weights folder") and "no such folder" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s.png").exists()
