"""slideredit.cli: alpha lists (commas or spaces, no empty entries, no repeats), finite numbers."""
import argparse

import pytest

from slideredit.cli import finite_float, join_alphas, parse_alphas, positive_int


@pytest.mark.parametrize("text", ["-1,-0.5,0,0.5,1", "-1 -0.5 0 0.5 1", "-1, -0.5, 0 , 0.5,1", " -1 -0.5  0 0.5 1 "])
def test_commas_and_spaces_give_the_same_alphas(text):
    assert parse_alphas(text) == [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("text", ["1,,2", "1,2,", ",1", ""])
def test_an_empty_entry_is_an_error(text):
    with pytest.raises(argparse.ArgumentTypeError, match="empty entry"):
        parse_alphas(text)


def test_a_repeated_alpha_says_which():
    with pytest.raises(argparse.ArgumentTypeError, match="lists 0 more than once"):
        parse_alphas("0,0")
    with pytest.raises(argparse.ArgumentTypeError, match="lists 0.5 more than once"):
        parse_alphas("-1 0.5 1 0.5")
    assert parse_alphas("0 0", flag="--slider-alphas", distinct=False) == [0.0, 0.0]  # one alpha per slider


@pytest.mark.parametrize("text, message", [("a,b", "comma-separated numbers"), ("1,nan", "finite"),
                                           ("inf", "finite"), ("-1e400", "finite")])
def test_non_numbers_and_non_finite_values_are_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_alphas(text)


def test_minimum_count():
    with pytest.raises(argparse.ArgumentTypeError, match="at least 2"):
        parse_alphas("1", minimum=2)


def test_join_alphas_glues_every_value_word_to_its_flag():
    assert join_alphas(["--alphas", "-1", "0", "1", "--out", "x"]) == ["--alphas=-1 0 1", "--out", "x"]
    assert join_alphas(["--alphas", "-1,-0.5,0"]) == ["--alphas=-1,-0.5,0"]
    assert join_alphas(["--slider-alphas", "-.5", "1e-3", "--alphas", "0", "-h"]) == [
        "--slider-alphas=-.5 1e-3", "--alphas=0", "-h"]
    assert join_alphas(["--alphas", "--out", "x"]) == ["--alphas", "--out", "x"]  # argparse reports the missing value
    assert join_alphas(["--prompt", "-1", "--alphas=0,1"]) == ["--prompt", "-1", "--alphas=0,1"]


def test_argparse_takes_negative_space_separated_alphas():
    parser = argparse.ArgumentParser()
    parser.add_argument("--alphas", type=parse_alphas)
    parser.add_argument("--out")
    args = parser.parse_args(join_alphas(["--alphas", "-1", "-0.5", "0", "--out", "o"]))
    assert args.alphas == [-1.0, -0.5, 0.0] and args.out == "o"


def test_finite_float_and_positive_int():
    assert finite_float("2.5") == 2.5 and positive_int("3") == 3
    for bad in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            finite_float(bad)
    for bad in ("0", "-2", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
