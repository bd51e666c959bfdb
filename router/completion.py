"""`event-router completion bash|zsh`: shell completion scripts, written from the argparse
parser itself, so a new command or option completes without anyone editing a script.

The parser is read as a tree of commands (the sub-parsers); for each command the script knows
its sub-commands, its options, which options take a value (a file for a `Path` option, one of
the choices when it has choices) and whether its positional arguments are files. Nothing is
imported at completion time: the script is plain shell, so completing costs no Python start.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

SHELLS = ("bash", "zsh")


@dataclass(slots=True)
class Command:
    """One node of the parser tree: `path` is the words that lead to it ("" for the top)."""

    path: str
    help: str
    subcommands: dict[str, str] = field(default_factory=dict)  # name -> help
    flags: list[tuple[list[str], str]] = field(default_factory=list)  # take no value
    options: list[tuple[list[str], str, tuple[str, ...] | None, bool]] = field(
        default_factory=list
    )  # (option strings, help, choices, takes a file)
    positionals: list[tuple[str, str, tuple[str, ...] | None, bool, bool]] = field(
        default_factory=list
    )  # (name, help, choices, a file, repeats)


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """Every command of the parser, the top first, each before its sub-commands."""
    found: list[Command] = []
    _walk(parser, "", parser.description or "", found)
    return found


def _walk(parser: argparse.ArgumentParser, path: str, text: str, found: list[Command]) -> None:
    command = Command(path, text)
    found.append(command)
    children: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                command.subcommands[name] = helps.get(name, "")
                children.append((name, sub, helps.get(name, "")))
        elif not action.option_strings:
            choices = tuple(str(c) for c in action.choices) if action.choices else None
            repeats = action.nargs in ("+", "*", argparse.REMAINDER)
            name = action.metavar if isinstance(action.metavar, str) else action.dest
            command.positionals.append(
                (
                    name,
                    _help(action),
                    choices,
                    action.type is Path,
                    repeats,
                )
            )
        elif action.nargs == 0:
            command.flags.append((list(action.option_strings), _help(action)))
        else:
            choices = tuple(str(c) for c in action.choices) if action.choices else None
            command.options.append(
                (list(action.option_strings), _help(action), choices, action.type is Path)
            )
    for name, sub, sub_help in children:
        _walk(sub, f"{path} {name}".strip(), sub_help, found)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    return text.replace("%(default)s", str(action.default)).replace("%%", "%")


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` (one of SHELLS)."""
    prog = parser.prog
    tree = commands(parser)
    return _bash(prog, tree) if shell == "bash" else _zsh(prog, tree)


def _function_name(prog: str, path: str = "") -> str:
    name = "_" + prog.replace("-", "_")
    return name + ("_" + path.replace(" ", "_").replace("-", "_") if path else "")


BASH_HELPERS = """\
__PROG_reply() { mapfile -t COMPREPLY < <(compgen "$@" -- "$cur"); }
__PROG_files() {
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")
}"""


def _bash(prog: str, tree: list[Command]) -> str:
    """A `complete -F` function: find the command from the words so far, then offer what
    follows an option that takes a value, or the command's sub-commands and options."""
    name = _function_name(prog)
    reply, files = f"_{name}_reply", f"_{name}_files"
    moves: list[str] = []
    values: list[str] = []
    offers: list[str] = []
    for command in tree:
        for sub in command.subcommands:
            moves.append(
                f'        "{command.path}:{sub}") cmd="{f"{command.path} {sub}".strip()}" ;;'
            )
        for strings, _, choices, is_file in command.options:
            pattern = "|".join(f'"{command.path}:{s}"' for s in strings)
            if choices:
                values.append(f'        {pattern}) {reply} -W "{" ".join(choices)}"; return ;;')
            elif is_file:
                values.append(f"        {pattern}) COMPREPLY=(); {files}; return ;;")
            else:
                values.append(f"        {pattern}) COMPREPLY=(); return ;;")
        offered = [*command.subcommands]
        offered += [s for strings, _ in command.flags for s in strings]
        offered += [s for strings, *_ in command.options for s in strings]
        offered += [c for p in command.positionals if p[2] for c in p[2]]
        offer = f'        "{command.path}") {reply} -W "{" ".join(offered)}"'
        if any(p[3] for p in command.positionals):
            offer += f"; [[ $cur == -* ]] || {files}"
        offers.append(offer + " ;;")
    return "\n".join(
        [
            f"# bash completion for {prog}, generated by `{prog} completion bash`. Load it with",
            f"# `source <({prog} completion bash)`, or save it as",
            f"# ~/.local/share/bash-completion/completions/{prog}.",
            BASH_HELPERS.replace("__PROG", f"_{name}"),
            f"{name}() {{",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" cmd="" i',
            '    ((COMP_CWORD > 0)) && prev="${COMP_WORDS[COMP_CWORD-1]}"',
            "    COMPREPLY=()",
            "    # The command so far: the sub-command words among the words before the cursor.",
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        case "$cmd:${COMP_WORDS[i]}" in',
            *(f"    {m}" for m in moves),
            "        esac",
            "    done",
            "    # After an option that takes a value: that value.",
            '    case "$cmd:$prev" in',
            *values,
            "    esac",
            '    case "$cmd" in',
            *offers,
            "    esac",
            "}",
            f"complete -F {name} {prog}",
            "",
        ]
    )


def _zsh_quote(text: str) -> str:
    """Text inside a single-quoted `_arguments` spec: brackets and colons escaped."""
    for char in "\\[]:":
        text = text.replace(char, "\\" + char)
    return text.replace("'", "'\\''")


def _zsh_action(choices: tuple[str, ...] | None, is_file: bool) -> str:
    return f"({' '.join(choices)})" if choices else ("_files" if is_file else " ")


def _zsh(prog: str, tree: list[Command]) -> str:
    """One function per command, each an `_arguments` call; a command with sub-commands
    dispatches to theirs by the word it was given."""
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}, generated by `{prog} completion zsh`. Save it as",
        f"# _{prog} in a directory on $fpath, or load it with `source <({prog} completion zsh)`.",
        "",
    ]
    for command in tree:
        specs: list[str] = []
        for strings, text in command.flags:
            if len(strings) > 1:
                group = " ".join(strings)
                specs.append(f"'({group})'{{{','.join(strings)}}}'[{_zsh_quote(text)}]'")
            else:
                specs.append(f"'{strings[0]}[{_zsh_quote(text)}]'")
        for strings, text, choices, is_file in command.options:
            action = _zsh_action(choices, is_file)
            specs += [f"'{s}[{_zsh_quote(text)}]:{s.lstrip('-')}:{action}'" for s in strings]
        for index, (name, _, choices, is_file, repeats) in enumerate(command.positionals, 1):
            where = "*" if repeats else str(index)
            specs.append(f"'{where}:{_zsh_quote(name)}:{_zsh_action(choices, is_file)}'")
        lines.append(f"{_function_name(prog, command.path)}() {{")
        if command.subcommands:
            names = " ".join(
                f"'{_zsh_quote(sub)}:{_zsh_quote(text)}'"
                for sub, text in command.subcommands.items()
            )
            specs += ["'1: :->command'", "'*:: :->argument'"]
            lines += [
                "    local curcontext=$curcontext state line",
                "    _arguments -C " + " \\\n        ".join(specs),
                "    case $state in",
                f"        command) local -a names=({names}); _describe command names ;;",
                "        argument)",
                "            case $line[1] in",
                *(
                    f"                {sub}) "
                    f"{_function_name(prog, f'{command.path} {sub}'.strip())} ;;"
                    for sub in command.subcommands
                ),
                "            esac ;;",
                "    esac",
            ]
        else:
            lines.append("    _arguments " + " \\\n        ".join(specs))
        lines += ["}", ""]
    top = _function_name(prog)
    lines += [
        "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then",
        f'    {top} "$@"',
        "else",
        f"    compdef {top} {prog}",
        "fi",
        "",
    ]
    return "\n".join(lines)
