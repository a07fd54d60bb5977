#!/usr/bin/env bash
# A walk through the Conductor image API with curl, following the examples of the
# original Conductor API guide: list, show, build for one target and for several, push
# a target image, a build and an image to one account and to several, and delete.
#
#   CONDUCTOR_URL=http://127.0.0.1:3000 CONDUCTOR_PASSWORD=... examples/api-tour.sh
#
# Builds use the `mock` target. The second target of the multi-target build is
# $SECOND_TARGET (default `testbed`, a test plugin: start the server with
# `--plugins <folder holding testbed.wasm>`); without it that build uses `mock` alone.
set -euo pipefail

URL="${CONDUCTOR_URL:-http://127.0.0.1:3000}"
AUTH="${CONDUCTOR_USER:-admin}:${CONDUCTOR_PASSWORD:?set CONDUCTOR_PASSWORD to the admin password}"
SECOND_TARGET="${SECOND_TARGET:-testbed}"
HERE="$(cd "$(dirname "$0")" && pwd)"

api() { # METHOD PATH [BODY]
  local method=$1 path=$2
  shift 2
  echo "+ curl -X $method $URL$path" >&2
  if [ $# -gt 0 ]; then
    curl -sS --fail-with-body -u "$AUTH" -X "$method" -H 'Content-Type: application/xml' --data-binary "$1" "$URL$path"
  else
    curl -sS --fail-with-body -u "$AUTH" -X "$method" -H 'Accept: application/xml' "$URL$path"
  fi
}

ids() { # ELEMENT < xml: the id attribute of each <ELEMENT ...>
  grep -o "<$1 [^>]*id=\"[^\"]*\"" | sed 's/.*id="\([^"]*\)".*/\1/'
}

field() { # ELEMENT < xml: the text of the first <ELEMENT>
  grep -o "<$1>[^<]*</$1>" | head -n1 | sed "s|<$1>\(.*\)</$1>|\1|"
}

wait_done() { # PATH: poll until the status is COMPLETE or FAILED
  local reply status
  for _ in $(seq 1 600); do
    reply=$(api GET "$1" 2>/dev/null)
    status=$(field status <<<"$reply")
    case "$status" in
      COMPLETE) echo "$1: COMPLETE $(field target_identifier <<<"$reply")"; return 0 ;;
      FAILED) echo "$1: FAILED: $(field error <<<"$reply")"; return 1 ;;
    esac
    sleep 0.2
  done
  echo "$1: still $status" >&2
  return 1
}

# The template goes in escaped, as Conductor's own client sends it.
TDL=$(sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' "$HERE/templates/fedora.tdl")

echo "== The entry point and the collections"
api GET /api
api GET /api/images.xml
api GET /api/builds.xml
api GET /api/target_images.xml
api GET /api/provider_images.xml

echo "== Build an image for one target"
reply=$(api POST /api/images.xml "<image><targets>mock</targets><tdl>$TDL</tdl><environment>default</environment></image>")
echo "$reply"
image=$(ids image <<<"$reply" | head -n1)
build=$(ids build <<<"$reply" | head -n1)
for ti in $(ids target_image <<<"$reply"); do wait_done "/api/target_images/$ti.xml"; done
api GET "/api/images/$image.xml"
api GET "/api/images/$image/builds.xml"
api GET "/api/builds/$build/target_images.xml"

echo "== Build an image for several targets"
targets=mock
if api GET "/api/provider_types/$SECOND_TARGET.xml" >/dev/null 2>&1; then
  targets="mock,$SECOND_TARGET"
else
  echo "(no $SECOND_TARGET plugin loaded: building for mock alone)"
fi
reply=$(api POST /api/images.xml "<image><targets>$targets</targets><tdl>$TDL</tdl><environment>default</environment></image>")
echo "$reply"
image2=$(ids image <<<"$reply" | head -n1)
build2=$(ids build <<<"$reply" | head -n1)
tis2=$(ids target_image <<<"$reply")
for ti in $tis2; do wait_done "/api/target_images/$ti.xml"; done

accounts="mock-acc"
[ "$targets" = mock ] || accounts="mock-acc,$SECOND_TARGET-acc"

push() { # SELECTOR ID ACCOUNTS
  local reply
  reply=$(api POST /api/provider_images.xml "<provider_image><$1>$2</$1><provider_account>$3</provider_account></provider_image>")
  echo "$reply"
  for pi in $(ids provider_image <<<"$reply"); do wait_done "/api/provider_images/$pi.xml"; done
}

echo "== Push a target image to one account"
push target_image_id "$(head -n1 <<<"$tis2")" mock-acc
echo "== Push a build to several accounts"
push build_id "$build2" "$accounts"
echo "== Push an image to several accounts"
push image_id "$image2" "$accounts"
api GET "/api/target_images/$(head -n1 <<<"$tis2")/provider_images.xml"

echo "== Delete what was made"
api DELETE "/api/images/$image.xml"
api DELETE "/api/images/$image2.xml"
echo "== Done"
