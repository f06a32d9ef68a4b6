"""`longserve chat`: a terminal chat REPL against an OpenAI-compatible server or a model run in this process.

    longserve chat                                   # the server at http://127.0.0.1:8000/v1, its first model
    longserve chat --base-url http://host:8000/v1 --api-key KEY --model NAME
    longserve chat --local                           # the default model, in this process
    longserve chat --local model.gguf --device cuda  # any engine option of `longserve serve`

Replies stream as they are generated; every turn resends the whole conversation. Ctrl-C while a reply streams
stops it (the request is aborted) and keeps the part already written in the history; Ctrl-C at the prompt
shows how to leave and a second one in a row leaves. A failed request prints one line and drops its turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from typing import TextIO

from longserve.clients.chat_backends import (
    ChatBackend,
    ChatError,
    LocalChat,
    Message,
    Reply,
    ServerChat,
    Settings,
    Thought,
)

PROMPT = ">>> "

HELP = """\
/system TEXT   set the system prompt and start a new conversation (/system alone shows it)
/reset         clear the conversation (the system prompt stays)
/set           show the settings; /set temperature 0.2, /set max_tokens 200 (or none) change them
/help          this text
/exit          leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while a reply streams stops it; the part already written stays in the conversation."""


class ChatRepl:
    """The conversation and the command loop; replies come from ``backend``, run on ``runner``'s event loop."""

    def __init__(
        self,
        backend: ChatBackend,
        runner: asyncio.Runner,
        settings: Settings,
        system: str | None = None,
        show_usage: bool = False,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.backend, self.runner, self.settings = backend, runner, settings
        self.system = system
        self.show_usage = show_usage
        self.out, self.err = out, err
        self.history: list[Message] = []  # user and assistant turns; the system prompt is added when sending

    def loop(self) -> int:
        """Read lines until /exit, EOF or two Ctrl-C in a row; returns the exit status."""
        interrupted = False
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    self.out.write("\n")
                    return 0
                interrupted = True
                self.out.write("\n(press Ctrl-C again, Ctrl-D or type /exit to leave)\n")
                continue
            interrupted = False
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                else:
                    self.turn(line)
            except KeyboardInterrupt:  # just outside a reply's stream, where turn() does not catch it
                self.out.write("\n")

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "/system":
            if not arg:
                self.say(f"system prompt: {self.system!r}" if self.system else "(no system prompt)")
            else:
                self.system = arg
                self.history.clear()
                self.say("(system prompt set; new conversation)")
        elif name == "/set":
            self.set(arg)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        value = value.strip()
        try:
            if key == "temperature" and value:
                self.settings.temperature = float(value)
            elif key == "max_tokens" and value:
                self.settings.max_tokens = None if value.lower() == "none" else int(value)
            elif key:
                self.say("usage: /set temperature FLOAT | /set max_tokens INT|none")
                return
        except ValueError:
            self.say(f"not a number: {value!r}")
            return
        self.say(f"temperature {self.settings.temperature}, max_tokens {self.settings.max_tokens}")

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def turn(self, text: str) -> None:
        """Send the conversation plus ``text``; stream the reply. Ctrl-C stops it, keeping what came."""
        self.history.append({"role": "user", "content": text})
        reply = Reply()
        start = time.perf_counter()
        try:
            self.runner.run(self._stream(reply))
        except KeyboardInterrupt:
            # The runner cancelled the stream, which closed the request: the server or engine aborts it.
            self.out.write("\n")
            self.note("[stopped]")
            self._end_turn(reply.text)
            return
        except ChatError as exc:
            if reply.text:
                self.out.write("\n")
            self.note(f"error: {exc}")
            self.history.pop()  # the request failed: as if it had not been sent
            return
        self.out.write("\n")
        self.out.flush()
        self._end_turn(reply.text)
        if self.show_usage:
            elapsed = time.perf_counter() - start
            self.note(
                f"[{reply.prompt_tokens} prompt tokens, {reply.completion_tokens} completion tokens, "
                f"finish: {reply.finish_reason}, {elapsed:.1f} s]"
            )

    def _end_turn(self, text: str) -> None:
        if text:
            self.history.append({"role": "assistant", "content": text})
        else:  # nothing came back: keep no empty reply, and no question without an answer
            self.history.pop()

    async def _stream(self, reply: Reply) -> None:
        thinking = False
        async for text in self.backend.stream(self.messages(), self.settings, reply):
            if isinstance(text, Thought):  # shown, marked, and kept out of the history
                if not thinking:
                    self.out.write("[thinking] ")
                    thinking = True
                self.out.write(text)
            else:
                if thinking:
                    self.out.write("\n[answer] ")
                    thinking = False
                reply.text += text
                self.out.write(text)
            self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def build_parser(prog: str) -> argparse.ArgumentParser:
    from longserve.engine_options import add_engine_arguments  # the engine flags of serve/generate

    # "resolve": chat's own --model (a server's model name) replaces the engine flags' --model (a path).
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog="commands in the REPL:\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    parser.add_argument("--system", help="system prompt (the REPL's /system changes it)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="most tokens per reply (default: until the model stops or fills context)",
    )
    parser.add_argument(
        "--show-usage",
        action="store_true",
        help="after each reply: prompt and completion tokens, finish, time",
    )
    server = parser.add_argument_group("server (the default mode)")
    server.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        help="OpenAI-compatible base URL (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)",
    )
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    local = parser.add_argument_group("local model: --local runs the engine in this process")
    local.add_argument(
        "--local",
        nargs="?",
        const="",
        metavar="MODEL_PATH",
        help="GGUF file or Hugging Face model directory (also given as --model; default SmolLM2-135M-Instruct)",
    )
    add_engine_arguments(local)
    server.add_argument(
        "--model", help="the server's model name (default: the first it lists); with --local, the model path"
    )
    return parser


def _backend(args: argparse.Namespace) -> ChatBackend:
    if args.local is None:
        return ServerChat(args.base_url, args.api_key, args.model)
    from longserve.engine_options import engine_config_from_args

    return LocalChat(
        engine_config_from_args(argparse.Namespace(**(vars(args) | {"model": args.local or args.model})))
    )


def main(argv: list[str] | None = None, prog: str = "longserve chat") -> int:
    args = build_parser(prog).parse_args(argv)
    with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    try:
        backend = _backend(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = Settings(temperature=args.temperature, max_tokens=args.max_tokens)
    with asyncio.Runner() as runner:
        try:
            try:
                runner.run(backend.open())
            except ChatError as exc:
                print(f"error: {exc}", file=sys.stderr)
                if args.local is not None:
                    return 2
                # A server may come up later: the REPL starts anyway and the first message asks again.
            except ValueError as exc:  # the local model failed to load
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                return 130
            print(f"longserve chat: {backend.label}. /help lists commands, /exit leaves.", flush=True)
            repl = ChatRepl(backend, runner, settings, system=args.system, show_usage=args.show_usage)
            return repl.loop()
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                runner.run(backend.close())


if __name__ == "__main__":
    sys.exit(main())
