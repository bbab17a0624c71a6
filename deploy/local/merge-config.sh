#!/usr/bin/env bash
# Writes a YAML configuration file with local settings merged into a reference one:
#
#   deploy/local/merge-config.sh BASE OVERRIDES > OUT
#
# up.sh makes data/local/gateway.yaml and admin.yaml with it from config/*.yaml, so that every
# section and setting appears once whatever the reference files hold (appending a section the
# reference file already has fails at start with "duplicate field").
#
# OVERRIDES is block-style YAML. A key whose value is on its own line (a scalar, a flow list or
# map) or is a block list is a setting: it replaces the same key of BASE, line and block, where
# it stands, or is added under its parent when BASE has none. A key whose value is a block
# mapping is walked into: only the keys it names change, at any depth. Where BASE has a one-line
# value (`keys: []`, `x: {a: 1}`) and OVERRIDES a block, the block replaces it. Everything else in
# BASE stays as it is: comments, order, other settings. Commented-out lines are documentation,
# never settings.
#
# Limits (both files are ours): block style, two-space indentation for the keys it adds, no
# multi-line scalars (`|`, `>`), keys without spaces or quotes. The result is checked: a key
# twice in one mapping fails the merge (exit 1) rather than the start. Needs bash and a POSIX awk
# (mawk, Debian's default, or gawk).
set -euo pipefail
[ $# -eq 2 ] && [ -f "$1" ] && [ -f "$2" ] || {
    echo "usage: $0 BASE OVERRIDES > OUT" >&2
    exit 2
}

# The structure of one line, shared by both awk programs. parse(line) sets IND (the column of
# the line's key, after a list item's "- "), KEY ("" when the line starts none), VAL (the rest
# of the line after "KEY:", comment stripped), ITEM (a "- " list item), SKIP (a blank or comment
# line) and PATH_ (the key's path, "/"-separated, list items as "[n]"), keeping a stack of
# (column, name) across lines. Call reset() before each file.
common='
function reset() { SP = 0; ITEMS = 0 }
function parse(line,   t, rest, i) {
    match(line, /^ */); IND = RLENGTH
    t = substr(line, IND + 1)
    SKIP = (t == "" || substr(t, 1, 1) == "#"); ITEM = 0; KEY = ""; VAL = ""
    if (SKIP) return
    if (t == "-" || substr(t, 1, 2) == "- ") {
        ITEM = 1
        while (SP > 0 && SI[SP] > IND) SP--
        SP++; SI[SP] = IND + 0.5; SN[SP] = "[" (++ITEMS) "]"
        t = substr(t, 2); match(t, /^ */); IND = IND + 1 + RLENGTH; t = substr(t, RLENGTH + 1)
    }
    if (!match(t, /^[A-Za-z_][A-Za-z0-9_.-]*:/)) return
    rest = substr(t, RLENGTH + 1)
    if (rest != "" && rest !~ /^[ \t]/) return
    KEY = substr(t, 1, RLENGTH - 1)
    sub(/^[ \t]+/, "", rest)
    if (substr(rest, 1, 1) == "#") rest = ""
    VAL = rest
    while (SP > 0 && SI[SP] >= IND) SP--
    SP++; SI[SP] = IND; SN[SP] = KEY
    PATH_ = SN[1]; for (i = 2; i <= SP; i++) PATH_ = PATH_ "/" SN[i]
}
'

merged=$(awk "$common"'
FNR == 1 { file++; reset() }
# OVERRIDES: every line; for each key outside lists its path, parent and line.
file == 1 {
    n++; L[n] = $0; parse($0)
    if (KEY != "" && PATH_ !~ /\[/) {
        nk++; KL[nk] = n; P[n] = PATH_; PI[n] = IND; V[n] = VAL; at[PATH_] = n
        parent = PATH_; if (!sub(/\/[^\/]*$/, "", parent)) parent = ""; PARENT[n] = parent
    }
    next
}
# BASE, first pass: the paths it sets.
file == 2 { parse($0); if (KEY != "") have[PATH_] = 1; next }
# BASE, second pass: written out merged.
file == 3 && FNR == 1 { analyse() }
file == 3 {
    parse($0)
    if (skipping) {
        # Inside a replaced block: skip its deeper lines (comments too); keep blank lines.
        if ($0 ~ /^[ \t]*$/) { print; next }
        match($0, /^ */)
        if (RLENGTH > skip_ind || (ITEM && RLENGTH == skip_ind)) next
        skipping = 0
    }
    if (KEY == "" || !(PATH_ in at)) { print; next }
    k = at[PATH_]
    if (SETTING[k] || VAL != "") {
        # A setting, or a one-line value where OVERRIDES has a block: replace it whole.
        emit(k, IND)
        skipping = 1; skip_ind = IND
        next
    }
    # A mapping in both: keep its line; add the keys only OVERRIDES has right under it.
    print
    for (c = k + 1; c <= last[k]; c++)
        if ((c in P) && PARENT[c] == P[k] && !(P[c] in have)) emit(c, IND + 2)
}
END {
    # Top-level sections BASE lacks, in OVERRIDES order.
    for (i = 1; i <= nk; i++) {
        k = KL[i]
        if (PARENT[k] == "" && !(P[k] in have)) { print ""; emit(k, 0) }
    }
}
# For each key: the last line of its block, and whether it is a setting (a value on its line,
# none at all, or a block list) rather than a mapping to walk into.
function analyse(   i, j, k, t) {
    for (i = 1; i <= nk; i++) {
        k = KL[i]; last[k] = k; first = 0
        for (j = k + 1; j <= n; j++) {
            match(L[j], /^ */); t = substr(L[j], RLENGTH + 1)
            if (t == "" || substr(t, 1, 1) == "#") continue
            isitem = (t == "-" || substr(t, 1, 2) == "- ")
            if (RLENGTH > PI[k] || (isitem && RLENGTH == PI[k])) {
                last[k] = j
                if (!first) first = isitem ? 2 : 1
            } else break
        }
        SETTING[k] = (V[k] != "" || first != 1)
    }
}
# Prints the key on line k with its block, shifted so that the key stands at column `to`.
function emit(k, to,   j) {
    for (j = k; j <= last[k]; j++) print shift(L[j], to - PI[k])
}
function shift(line, by) {
    if (line ~ /^[ \t]*$/) return ""
    if (by > 0) return sprintf("%" by "s", "") line
    return substr(line, 1 - by)
}
' "$2" "$1" "$1")

# The check: no key twice in one mapping (each list item is a mapping of its own).
dups=$(printf '%s\n' "$merged" | awk "$common"'
BEGIN { reset() }
{ parse($0); if (KEY != "") { if (PATH_ in seen) print "  " PATH_ ": lines " seen[PATH_] " and " NR; seen[PATH_] = NR } }
')
if [ -n "$dups" ]; then
    echo "$0: $2 merged into $1 sets these keys twice:" >&2
    echo "$dups" >&2
    exit 1
fi
printf '%s\n' "$merged"
