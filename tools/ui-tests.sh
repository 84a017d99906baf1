#!/usr/bin/env bash
# The status page in a real browser (tests/it/ui_browser.rs): headless Chromium driven over
# WebDriver by chromedriver, with axe-core run in the page. Installs axe-core from the npm
# registry into target/ui/ (cached, pinned below); Chromium and chromedriver come from Debian's
# packages (`apt-get install chromium chromium-driver`; .ci/run installs them). Fails with the
# reason when one is missing. Screenshots land in target/ui/.
set -euo pipefail
cd "$(dirname "$0")/.."

AXE_VERSION=4.14.1
die() { echo "ui-tests: $*" >&2; exit 1; }
chromium=${MESHID_CHROMIUM:-/usr/bin/chromium}
chromedriver=${MESHID_CHROMEDRIVER:-/usr/bin/chromedriver}
[ -x "$chromium" ] || die "Chromium not found at $chromium: apt-get install chromium (or set MESHID_CHROMIUM)"
[ -x "$chromedriver" ] || die "chromedriver not found at $chromedriver: apt-get install chromium-driver (or set MESHID_CHROMEDRIVER)"
command -v npm >/dev/null || die "npm not found: it installs axe-core (apt-get install npm, or Node.js from nodejs.org)"

axe="target/ui/node_modules/axe-core"
if [ "$(node -p "require('./$axe/package.json').version" 2>/dev/null || true)" != "$AXE_VERSION" ]; then
  mkdir -p target/ui
  (cd target/ui && npm install --no-save --no-audit --no-fund --loglevel=error "axe-core@$AXE_VERSION") ||
    die "npm install axe-core@$AXE_VERSION failed (above)"
fi
export MESHID_CHROMIUM="$chromium" MESHID_CHROMEDRIVER="$chromedriver" MESHID_AXE_JS="$PWD/$axe/axe.min.js"
echo "ui-tests: $("$chromium" --version 2>/dev/null | head -1), $("$chromedriver" --version | cut -d' ' -f1-2), axe-core $AXE_VERSION" >&2
cargo test --test it ui_browser -- --include-ignored --nocapture "$@"
