"""Stop strings on generated text: held-back prefixes, matches across pieces, flushing."""

from __future__ import annotations

import itertools

import pytest

from worker.engine.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], str, bool]:
    """Feed pieces; return what each push released, the final text, whether it stopped."""
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.push(p))
        if m.stopped:
            break
    tail = "" if m.stopped else m.flush()
    return out, "".join(out) + tail, m.stopped


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """What must come out in total, reading character by character: the text before the
    stop string that completes first (the longest of those completing together)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def test_no_stops_passes_text_through_unchanged() -> None:
    out, text, stopped = run([], ["a", "b\n", ""])
    assert out == ["a", "b\n", ""] and text == "ab\n" and not stopped


def test_stop_spanning_three_pieces() -> None:
    out, text, stopped = run(["END"], ["hello E", "N", "D world"])
    assert stopped and text == "hello "
    assert out == ["hello ", "", ""]  # "E" and "EN" were held back until decided


def test_held_prefix_is_released_when_it_turns_out_not_to_match() -> None:
    out, text, stopped = run(["END"], ["x E", "N", "O y"])
    assert not stopped and text == "x ENO y"
    assert out == ["x ", "", "ENO y"]


def test_stop_at_the_very_start() -> None:
    out, text, stopped = run(["<|x|>"], ["<|x", "|> and more"])
    assert stopped and text == "" and out == ["", ""]
    out, text, stopped = run(["Hi"], ["Hi there"])
    assert stopped and text == ""


def test_multiple_stops_first_completed_wins() -> None:
    _, text, stopped = run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stopped and text == "hel"
    # "cd" completes before "bcde" does, whatever the pieces
    for pieces in (["abcdef"], ["ab", "cdef"], ["a", "b", "c", "d", "e"]):
        assert run(["bcde", "cd"], pieces)[1] == "ab"
    # two stops completing at the same character: the longer one is removed
    assert run(["c", "bc"], ["abcd"])[1] == "a"


def test_overlapping_prefixes_are_not_lost() -> None:
    # "aab": after "aa" the held text must keep the last "a", not drop it
    out, text, stopped = run(["aab"], ["a", "a", "a", "b", "c"])
    assert out == ["", "", "a", ""]
    assert stopped and text == "a"
    _, text, stopped = run(["abab"], ["ab", "ab", "ab"])
    assert stopped and text == ""
    _, text, stopped = run(["abac"], ["aba", "bac"])
    assert stopped and text == "ab"


def test_multibyte_stop_strings() -> None:
    _, text, stopped = run(["终止"], ["你好", "终", "止吧"])
    assert stopped and text == "你好"
    _, text, stopped = run(["🙂!"], ["ok 🙂", " no", " 🙂", "!"])
    assert stopped and text == "ok 🙂 no "


def test_flush_returns_everything_held() -> None:
    m = StopMatcher(["\n\n"])
    assert m.push("line\n") == "line"
    assert m.held == "\n"
    assert m.flush() == "\n"
    assert m.held == ""


def test_after_a_stop_nothing_more_is_released() -> None:
    m = StopMatcher(["x"])
    assert m.push("ax b") == "a"
    assert m.stopped and m.matched == "x"
    assert m.push("more") == "" and m.flush() == ""


def test_empty_and_duplicate_stops_are_ignored() -> None:
    m = StopMatcher(["", "z", "z"])
    assert m.stops == ("z",)
    assert StopMatcher([""]).push("abc") == "abc"


@pytest.mark.parametrize("stops", [["ab"], ["aba", "b"], ["aab", "ba"], ["abc", "bca", "cc"]])
def test_exhaustive_small_alphabet(stops: list[str]) -> None:
    """Every string over {a,b,c} up to length 6, cut into three pieces every possible way
    and into single characters: the released text always equals the reference."""
    for n in range(7):
        for chars in itertools.product("abc", repeat=n):
            text = "".join(chars)
            want = reference(stops, text)
            _, got, stopped = run(stops, list(text))
            assert (got, stopped) == want, (stops, text)
            for i in range(n + 1):
                for j in range(i, n + 1):
                    _, got, stopped = run(stops, [text[:i], text[i:j], text[j:]])
                    assert (got, stopped) == want, (stops, text, i, j)
