"""The prompt policy: a blocklist of words and regular expressions, and an optional external moderation hook.

Both run on the prompt and the negative prompt of every generation route before anything is queued; a match
is a 400 `prompt_rejected` naming the field. Text is compared after Unicode NFKC normalisation and case
folding, so full-width letters, `Bad` and `bad` are one word. The blocklist file is re-read when it changes and on
SIGHUP; a new version that does not parse is logged and the previous one kept (docs/safety.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.errors import ApiError

logger = logging.getLogger(__name__)

# How often the blocklist file is looked at; an edit takes effect within this (a SIGHUP at once).
BLOCKLIST_RELOAD_INTERVAL_S = 2.0
REGEX_PREFIX = "re:"
FIELDS = ("prompt", "negative_prompt")


class BlocklistError(ValueError):
    """The blocklist file cannot be read, or a line of it is not a valid rule."""


def normalise(text: str) -> str:
    """What rules and prompts are compared as: NFKC (full-width and compatibility forms folded) and case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass(frozen=True)
class Rule:
    """One line of the blocklist: where it came from and the pattern it compiled to."""

    source: str  # `FILE:LINE`
    pattern: re.Pattern[str]


def parse_blocklist(text: str, source: str) -> tuple[Rule, ...]:
    """The rules of a blocklist file: one per line, `#` comments and blank lines skipped.

    A line `re:PATTERN` is a regular expression, searched case-insensitively in the normalised text; any other
    line is a word or phrase, matched whole (not inside a longer word) after normalisation.
    """
    rules = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        rules.append(Rule(where, _compile(line, where)))
    return tuple(rules)


def _compile(line: str, where: str) -> re.Pattern[str]:
    if not line.startswith(REGEX_PREFIX):
        return re.compile(rf"(?<!\w){re.escape(normalise(line))}(?!\w)")
    try:
        return re.compile(line[len(REGEX_PREFIX) :], re.IGNORECASE)
    except re.error as exc:
        raise BlocklistError(f"{where}: not a regular expression: {exc}") from None


def load_blocklist(path: Path) -> tuple[Rule, ...]:
    """Read and parse a blocklist file. Raises BlocklistError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BlocklistError(f"cannot read the prompt blocklist {path}: {exc}") from None
    return parse_blocklist(text, str(path))


def rejected(field: str, why: str) -> ApiError:
    """The answer to a prompt the policy refuses."""
    return ApiError(400, "prompt_rejected", f"{field}: {why}", field=field)


class Blocklist:
    """The rules in force, from a file re-read when it changes (or on `reload()`, which SIGHUP calls)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.rules = self._read()
        self.on_reload: list[Callable[[], object]] = []  # told, on the event loop, after the rules were replaced

    def _read(self) -> tuple[Rule, ...]:
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            raise BlocklistError(f"cannot read the prompt blocklist {self.path}: {exc}") from None
        rules = load_blocklist(self.path)
        self._stamp = stamp
        return rules

    def reload(self, force: bool = False) -> bool:
        """Re-read the file if it changed (always with `force`); True if the rules were replaced."""
        try:
            if not force and _stamp(self.path) == self._stamp:
                return False
            rules = self._read()
        except (OSError, BlocklistError) as exc:
            logger.warning("keeping the previous prompt blocklist: %s", exc)
            return False
        self.rules = rules
        logger.info("prompt blocklist reloaded from %s: %d rules", self.path, len(rules))
        return True

    def check(self, prompts: dict[str, str]) -> None:
        """Raise 400 `prompt_rejected` naming the first field a rule matches."""
        for field in FIELDS:
            text = normalise(prompts.get(field, ""))
            for rule in self.rules:
                if rule.pattern.search(text):
                    logger.info("%s rejected by the prompt blocklist (%s)", field, rule.source)
                    raise rejected(field, "refused by the prompt policy")

    def hangup(self) -> None:
        """SIGHUP's handler: re-read the file now, changed or not."""
        if self.reload(force=True):
            self._tell()

    async def watch(self) -> None:
        """Re-read the file whenever it changes, until cancelled."""
        while True:
            await asyncio.sleep(BLOCKLIST_RELOAD_INTERVAL_S)
            if await asyncio.to_thread(self.reload):
                self._tell()

    def _tell(self) -> None:
        for callback in self.on_reload:
            callback()


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ModerationHook:
    """An external moderation service, asked about every prompt (docs/safety.md: Moderation hook).

    The gateway POSTs `{"prompt": ..., "negative_prompt": ...}` as JSON; a 2xx answer of `{"flagged": true}`
    rejects the request (`"field"` names the field at fault, `prompt` when absent). A timeout, an error status
    or an answer that is not that JSON is a failure: `fail="closed"` answers 503 `moderation_unavailable`,
    `fail="open"` lets the request through.
    """

    def __init__(self, url: str, timeout_s: float, fail: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.fail_open = fail == "open"
        self.session = session

    async def check(self, prompts: dict[str, str]) -> None:
        """Raise 400 `prompt_rejected` when the service flags the prompts, 503 when it fails and fail is closed."""
        try:
            verdict = await self._ask(prompts)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(exc)
            return
        if verdict.get("flagged") is True:
            field = verdict.get("field")
            field = field if field in FIELDS else "prompt"
            reason = verdict.get("reason")
            raise rejected(field, reason if isinstance(reason, str) and reason else "refused by the moderation service")

    async def _ask(self, prompts: dict[str, str]) -> dict[str, Any]:
        async with self.session.post(self.url, json=prompts, timeout=self.timeout) as response:
            if response.status // 100 != 2:
                raise ValueError(f"answered HTTP {response.status}")
            verdict = await response.json(content_type=None)
        if not isinstance(verdict, dict) or not isinstance(verdict.get("flagged"), bool):
            raise ValueError('the answer is not a JSON object with a boolean "flagged"')
        return verdict

    def _failed(self, exc: BaseException) -> None:
        what = f"the moderation service {self.url} failed: {exc.__class__.__name__}: {exc}"
        if self.fail_open:
            logger.warning("%s; letting the request through (--moderation-fail open)", what)
            return
        logger.warning("%s; refusing the request (--moderation-fail closed)", what)
        raise ApiError(
            503,
            "moderation_unavailable",
            "the prompt moderation service is unavailable; retry shortly",
            headers={"Retry-After": "2"},
        )


class PromptPolicy:
    """The blocklist and the moderation hook, either optional, applied in that order."""

    def __init__(self, blocklist: Blocklist | None = None, hook: ModerationHook | None = None) -> None:
        self.blocklist = blocklist
        self.hook = hook

    async def check(self, prompt: str, negative_prompt: str) -> None:
        """Raise ApiError when the policy refuses these prompts."""
        prompts = {"prompt": prompt, "negative_prompt": negative_prompt}
        if self.blocklist is not None:
            self.blocklist.check(prompts)
        if self.hook is not None:
            await self.hook.check(prompts)
