#!/usr/bin/env bash
# 33rd session, call 1: the 32nd session's script for it, as written there
exec bash benchmarks/results/h200-2026-12-03-s32/scripts/next_session.sh "$@"
