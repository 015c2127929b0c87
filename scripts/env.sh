# Sourced by the other scripts: puts PostgreSQL's server binaries on PATH when Debian keeps
# them out of it.
if ! command -v initdb >/dev/null; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$pg_bin" ] && export PATH="$pg_bin:$PATH"
fi
