"""A reply's text from token pieces: characters split across tokens, stop strings (no model)."""

from __future__ import annotations

from backends.llamacpp.text import ReplyText, stop_prefix_len


def feed(text: ReplyText, pieces: list[bytes]) -> tuple[list[str], bool]:
    sent: list[str] = []
    for piece in pieces:
        out, stopped = text.add(piece)
        if out:
            sent.append(out)
        if stopped:
            return sent, True
    return sent, False


def test_a_character_split_across_tokens_is_sent_whole() -> None:
    heart = "\u2764".encode()  # three bytes
    sent, stopped = feed(ReplyText(()), [b"I ", heart[:1], heart[1:2], heart[2:], b" tea"])
    assert sent == ["I ", "\u2764", " tea"] and not stopped


def test_a_stop_string_spanning_tokens_ends_the_reply_before_it() -> None:
    sent, stopped = feed(ReplyText(("END",)), [b"one E", b"N", b"D two"])
    assert stopped
    assert "".join(sent) == "one "  # "E" and "N" were held back, never sent


def test_held_text_that_does_not_become_a_stop_string_is_released() -> None:
    text = ReplyText(("END",))
    sent, stopped = feed(text, [b"one E", b"N", b"o"])
    assert not stopped and "".join(sent) == "one ENo"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    sent, stopped = feed(ReplyText(("world", "lo w")), [b"hello world"])
    assert stopped and sent == ["hel"]


def test_flush_sends_a_partial_stop_string_and_a_cut_character() -> None:
    text = ReplyText(("END",))
    assert feed(text, [b"so E"]) == (["so "], False)
    assert text.flush() == "E"
    cut = ReplyText(())
    assert cut.add("\u2764".encode()[:2]) == ("", False)
    assert cut.flush() == "\ufffd"


def test_stop_prefix_len() -> None:
    assert stop_prefix_len("abc", ("cde",)) == 1
    assert stop_prefix_len("abcd", ("cde", "bcdx")) == 3
    assert stop_prefix_len("abc", ("x",)) == 0
