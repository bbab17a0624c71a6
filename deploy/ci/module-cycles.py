#!/usr/bin/env python3
"""Fails when a crate's top-level modules import each other in a circle.

    deploy/ci/module-cycles.py CRATE_SRC_DIR...      (run by deploy/local/test.sh)

Every `crate::X` reference counts (use lines, `use crate::{a, b::c}`, paths written inline);
comments are skipped. A file under a directory module (`limits/local.rs`) belongs to that module
(`limits`). Prints each crate's edges on a cycle, naming the files that make them.
"""
import os
import re
import sys


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"^\s*//.*$", "", line) for line in text.splitlines())


def references(text):
    out = set()
    for m in re.finditer(r"\bcrate::\{([^}]*)\}", text, flags=re.S):
        for part in m.group(1).split(","):
            name = part.strip().split("::")[0].strip()
            if name and name != "self":
                out.add(name)
    for m in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", text):
        out.add(m.group(1))
    return out


def graph_of(src):
    graph, sites = {}, {}
    for root, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, src).split(os.sep)
            module = parts[0][:-3] if len(parts) == 1 else parts[0]
            if module in ("lib", "main"):
                continue
            graph.setdefault(module, set())
            for target in references(strip_comments(open(path).read())):
                if target != module:
                    graph[module].add(target)
                    sites.setdefault((module, target), set()).add(os.path.relpath(path, src))
    return graph, sites


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def main():
    failed = False
    for src in sys.argv[1:]:
        graph, sites = graph_of(src)
        cycle = find_cycle(graph)
        if cycle:
            failed = True
            print(f"{src}: modules import each other in a circle: {' -> '.join(cycle)}")
            for a, b in zip(cycle, cycle[1:]):
                print(f"  {a} -> {b}: {', '.join(sorted(sites[(a, b)]))}")
        else:
            print(f"{src}: {len(graph)} modules, no circle")
    sys.exit(1 if failed else 0)


main()
