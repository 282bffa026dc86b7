#!/bin/sh
# Command-line parsing shared by the subcommands: "--" ends the options and positional text may
# start with '-' ("- item" is a Markdown list item, not an option). Runs the real binary.
# usage: test_cli_args.sh DELTASERVE MODEL    (exits 77 = skipped when MODEL is missing)
bin=$1
model=$2
if [ ! -r "$model" ]; then
    echo "SKIP: no model at $model (run scripts/fetch_model.sh)"
    exit 77
fi
fails=0

# expect_ids IDS ARGS...: `deltaserve tokenize -m MODEL ARGS...` prints IDS and exits 0.
# SmolLM2 adds no BOS; '-' is 29 and ' item' is 5033 in its vocabulary.
expect_ids() {
    want=$1
    shift
    got=$("$bin" tokenize -m "$model" "$@" 2>&1)
    rc=$?
    if [ "$rc" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "FAIL: tokenize $*: rc=$rc output '$got', want '$want'"
        fails=$((fails + 1))
    fi
}

# expect_rc RC ARGS...: `deltaserve ARGS...` exits RC.
expect_rc() {
    want=$1
    shift
    "$bin" "$@" >/dev/null 2>&1
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        echo "FAIL: deltaserve $*: rc=$rc, want $want"
        fails=$((fails + 1))
    fi
}

expect_ids "29 5033" -- "- item"
expect_ids "29 5033" "- item"
expect_ids "29:'-' 5033:' item'" --pieces -- "- item"
expect_ids "29 5033" --no-special -- "- item"
expect_ids "29" -- "-"
expect_rc 0 tokenize -m "$model" -- --help
expect_rc 2 tokenize -m "$model" --bogus
expect_rc 2 tokenize -m "$model" one two
expect_rc 2 tokenize -m "$model" --
expect_rc 2 tokenize -m "$model" -- "- item" --no-special
expect_rc 2 serve -- stray
expect_rc 2 serve stray
expect_rc 0 generate -m "$model" -n 1 -t 1 -- "- item"
# a switch (no value) among options with values: what follows it is still parsed
expect_rc 0 generate -m "$model" --int8-activations -n 1 -t 1 "Hi"
expect_rc 2 serve -m "$model" --int8-activations --port
"$bin" serve --help | grep -q -- "--int8-activations" || { echo "FAIL: serve --help lacks --int8-activations"; fails=$((fails + 1)); }

if [ "$fails" -ne 0 ]; then
    echo "$fails check(s) failed"
    exit 1
fi
echo "ok"
