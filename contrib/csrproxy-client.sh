#!/bin/sh
# csrproxy-client.sh: csrproxy's installation client in POSIX sh, with only openssl and curl.
# The same job, files and exit codes as the Python csrproxy-client; run it with --help.
set -u -f # no globbing: names and paths are words, never patterns

PROG=csrproxy-client.sh
EXIT_OK=0 EXIT_REFUSED=1 EXIT_USAGE=2 EXIT_NETWORK=3 EXIT_RELOAD=4
STATE_FILE=csrproxy.state
LOCK_DIR=.csrproxy-sh.lock

usage() {
	cat <<'EOF'
usage: csrproxy-client.sh issue --url URL --dir DIR [options]
       csrproxy-client.sh renew --dir DIR [options]

Get a publicly trusted certificate for this installation from csrproxy, and keep it
valid. Needs only a POSIX shell, openssl and curl.

issue   make (or reuse) DIR/key.pem, learn the name (GET /v1/name) unless --name is
        given, sign (POST /v1/sign), check the chain and install key.pem, cert.pem
        (leaf + chain), chain.pem and csrproxy.state (what renew needs) atomically.
renew   when cert.pem is missing, does not match key.pem, has less than a third of its
        lifetime left, or with --force: sign again with the same key (a new one with
        --rotate-key) and the names in csrproxy.state; else do nothing.

options:
  --dir DIR            where key.pem, cert.pem, chain.pem and csrproxy.state live
  --url URL            csrproxy's base URL (issue; renew reads it from the state)
  --name NAME          a DNS name (repeatable; issue); without it the server names the
                       key ({key} patterns), again at every renewal
  --key-type T         ec256 (default), ec384, rsa2048, rsa3072, rsa4096
  --rotate-key         make a new key (it replaces key.pem only with the new
                       certificate); --new-key is the same
  --token-file F       file holding the bearer token (its path is kept for renew)
  --ca-file F          CA file trusted for an https:// URL (--cacert is the same)
  --root F             PEM root the chain must lead to
  --insecure           allow the token over plain http:// (a network you trust only;
                       kept for renew); https:// checks stay on
  --async              ask for an asynchronous answer (Prefer: respond-async) and poll
  --timeout S          overall deadline in seconds (default 600)
  --force              renew now, due or not (renew)
  --reload-command C   run C through sh after the files changed (renew)
  -q, --quiet          warnings and errors only
  -v, --verbose        debug details
  -h, --help           this text

exit codes (those of csrproxy-client):
  0  ok (renew: also "not due")
  1  the server or the CA refused (a problem document, a failed order, a chain that
     fails the checks), a redirect, or a URL outside --url's origin
  2  usage, or a local problem: bad arguments, no state, an unreadable key, token or
     root file, no name offered, a token over http:// without --insecure, a directory
     others can write, a symbolic link in it
  3  network: the server cannot be reached, or no certificate before --timeout (or
     another run holding the lock until then); run again
  4  renew changed the files but --reload-command failed
EOF
}

# -- logging and failing ------------------------------------------------------

VERBOSITY=1
log() { [ "$VERBOSITY" -ge 1 ] && printf '%s: %s\n' "$PROG" "$*" >&2; return 0; }
debug() { [ "$VERBOSITY" -ge 2 ] && printf '%s: %s\n' "$PROG" "$*" >&2; return 0; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
	code=$1
	shift
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit "$code"
}

# -- small helpers ------------------------------------------------------------

now() {
	t=$(date -u +%s 2>/dev/null)
	case $t in
	'' | *[!0-9]*) awk 'BEGIN { srand(); print srand() }' ;; # POSIX awk's clock
	*) printf '%s\n' "$t" ;;
	esac
}

is_number() { case $1 in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$(pwd)" "$1" ;; esac; }

# fsync what can be: GNU and busybox sync take files; others flush everything.
flush() { sync "$@" 2>/dev/null || sync; }

# Refuse (exit 2) a file or directory that group or others can write, as csrproxy-client.
refuse_writable() {
	# shellcheck disable=SC2012 # ls -ld is the portable way to read a mode
	perms=$(ls -ld "$1" | cut -c1-10)
	case $perms in
	?????w???? | ????????w?)
		die "$EXIT_USAGE" "refusing $2 $1: group or others can write it ($perms);" \
			"whoever can write it can plant a key or send the token elsewhere (chmod go-w)"
		;;
	esac
}

# -- URLs ---------------------------------------------------------------------

# scheme://host:port of an http(s) URL (lowercased, default port filled in); fails otherwise.
origin_of() {
	printf '%s\n' "$1" | awk '{
		u = $0
		i = index(u, "://"); if (i == 0) exit 1
		scheme = tolower(substr(u, 1, i - 1)); rest = substr(u, i + 3)
		if (scheme != "http" && scheme != "https") exit 1
		j = match(rest, /[\/?#]/); if (j) rest = substr(rest, 1, j - 1)
		k = index(rest, "@"); while (k) { rest = substr(rest, k + 1); k = index(rest, "@") }
		if (substr(rest, 1, 1) == "[") { e = index(rest, "]"); host = substr(rest, 1, e); port = substr(rest, e + 2) }
		else { c = index(rest, ":"); if (c) { host = substr(rest, 1, c - 1); port = substr(rest, c + 1) } else { host = rest; port = "" } }
		if (host == "" || host == "[]") exit 1
		if (port == "") port = (scheme == "https") ? 443 : 80
		print scheme "://" tolower(host) ":" port
	}'
}

# The absolute URL of a Location the server gave (absolute, or a path on BASE), when it is in
# BASE's origin; else exit 1: the token goes to --url's origin only.
same_origin_url() {
	case $1 in
	/*) printf '%s%s\n' "$BASE_ORIGIN_URL" "$1" ;;
	http://* | https://* | HTTP://* | HTTPS://*)
		o=$(origin_of "$1") || die "$EXIT_REFUSED" "the server named a bad URL: $1"
		[ "$o" = "$ORIGIN" ] || die "$EXIT_REFUSED" "the server pointed the client at $1," \
			"outside $BASE: refused ($PROG talks to the origin of --url only)"
		printf '%s\n' "$1"
		;;
	*) die "$EXIT_REFUSED" "the server named a URL this client does not follow: $1" ;;
	esac
}

# -- HTTP ---------------------------------------------------------------------

# http METHOD URL [BODYFILE [EXTRA-HEADER]]: one request; sets STATUS, $WORK/headers and
# $WORK/body. A failure to talk to the server returns 3 (the caller decides); a 3xx answer
# is exit 1 at once. Redirects are never followed (no -L), so the token goes nowhere else.
http() {
	method=$1 url=$2 bodyfile=${3:-} extra=${4:-}
	left=$(($(deadline_left) + 0))
	[ "$left" -gt 0 ] || die "$EXIT_NETWORK" "no certificate before the deadline (--timeout)"
	[ "$left" -gt 300 ] && left=300
	: >"$WORK/headers"
	: >"$WORK/body"
	# The token goes in a 0600 config file, never on the command line (ps would show it).
	{
		printf 'url = "%s"\n' "$(curl_quote "$url")"
		printf 'request = "%s"\n' "$method"
		printf 'header = "Accept: application/pem-certificate-chain, application/json"\n'
		[ -n "$TOKEN" ] && printf 'header = "Authorization: Bearer %s"\n' "$(curl_quote "$TOKEN")"
		[ -n "$extra" ] && printf 'header = "%s"\n' "$(curl_quote "$extra")"
		if [ -n "$bodyfile" ]; then
			printf 'header = "Content-Type: application/pkcs10"\n'
			printf 'data-binary = "@%s"\n' "$(curl_quote "$bodyfile")"
		fi
		[ -n "$CA_FILE" ] && printf 'cacert = "%s"\n' "$(curl_quote "$CA_FILE")"
	} >"$WORK/curlrc"
	debug "$method $url"
	STATUS=$(curl -q -sS --proto =http,https --connect-timeout 30 --max-time "$left" \
		-K "$WORK/curlrc" -D "$WORK/headers" -o "$WORK/body" -w '%{http_code}' 2>"$WORK/curlerr")
	rc=$?
	if [ "$rc" -ne 0 ]; then
		NETERR="cannot reach $url: $(tr '\n' ' ' <"$WORK/curlerr")(curl exit $rc)"
		return 3
	fi
	# Headers of the last response only (a 100 Continue comes first), CRs removed.
	tr -d '\r' <"$WORK/headers" | awk '/^HTTP\//{n=0} {h[++n]=$0} END{for(i=1;i<=n;i++) print h[i]}' \
		>"$WORK/headers.last"
	case $STATUS in
	3??) die "$EXIT_REFUSED" "$method $url answered $STATUS, a redirect to" \
		"$(header location || echo '(no Location)'): $PROG follows no redirect, so that" \
		"its token goes nowhere else; if it is csrproxy, give that URL to issue --url" ;;
	esac
	return 0
}

curl_quote() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

# The value of a response header (case-insensitive), or fail.
header() {
	awk -v want="$1" 'BEGIN { want = tolower(want) ":" }
		{ i = index($0, ":"); if (i && tolower(substr($0, 1, i)) == want) {
			v = substr($0, i + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v); print v; found = 1; exit } }
		END { exit !found }' "$WORK/headers.last"
}

# A JSON string field of the body (a flat look-up: enough for csrproxy's documents).
json_field() {
	tr -d '\n' <"$WORK/body" | sed -n "s/.*\"$1\"[ 	]*:[ 	]*\"\\([^\"]*\\)\".*/\\1/p" | head -n 1
}

problem_text() {
	d=$(json_field detail)
	t=$(json_field type)
	if [ -n "$d" ]; then
		printf '%s (%s)\n' "$d" "${t##*/}"
	else
		head -c 200 "$WORK/body" 2>/dev/null | tr '\n' ' '
	fi
}

refused() { die "$EXIT_REFUSED" "$1: $STATUS $(problem_text)"; }

deadline_left() { echo $((DEADLINE - $(now))); }

# Sleep as Retry-After asks (delta-seconds; 1 if absent or a date), at least FLOOR and at
# most 30, if that fits before the deadline; else fail (a 429/503 is a refusal, exit 1).
pause() {
	why=$1 floor=${2:-0}
	delay=$(header retry-after 2>/dev/null)
	is_number "$delay" || delay=1
	[ "$delay" -lt "$floor" ] && delay=$floor
	[ "$delay" -gt 30 ] && [ "$STATUS" != 429 ] && [ "$STATUS" != 503 ] && delay=30
	if [ $(($(now) + delay)) -gt "$DEADLINE" ]; then
		case $STATUS in
		429 | 503) refused "$why, retry after ${delay}s" ;;
		esac
		die "$EXIT_NETWORK" "no certificate before the deadline (--timeout)"
	fi
	debug "$why; waiting ${delay}s"
	sleep "$delay"
}

# -- the server's routes ------------------------------------------------------

# The concrete names the policy gives the key in $1 (GET /v1/name with its public key),
# space-separated in FOUND; {label} patterns are left out, since only the client can choose
# a label.
server_names() {
	openssl pkey -in "$1" -pubout -out "$WORK/pub.pem" 2>"$WORK/err" ||
		die "$EXIT_USAGE" "cannot read the key $1: $(cat "$WORK/err")"
	http GET "$BASE/v1/name" "$WORK/pub.pem" || die "$EXIT_NETWORK" "$NETERR"
	[ "$STATUS" = 200 ] || refused "GET /v1/name"
	grep -q '"names"' "$WORK/body" || die "$EXIT_REFUSED" "/v1/name gave no name list"
	FOUND=$(tr -d '\n' <"$WORK/body" | sed -n 's/.*"names"[ 	]*:[ 	]*\[\([^]]*\)\].*/\1/p' |
		tr ',' '\n' | sed -n 's/^[ 	]*"\([A-Za-z0-9.-]*\)"[ 	]*$/\1/p' | tr '\n' ' ')
	FOUND=${FOUND% }
}

# POST the CSR in $1 and wait for its chain into $WORK/chain.pem: synchronously, or by
# polling the order after a 202; 429s and 503s with Retry-After are retried when that fits.
sign() {
	prefer=
	[ "$ASYNC" = 1 ] && prefer="Prefer: respond-async"
	while :; do
		http POST "$BASE/v1/sign" "$1" "$prefer" || die "$EXIT_NETWORK" "$NETERR"
		case $STATUS in
		200) break ;;
		202) poll_order; return ;;
		429) pause "rate-limited" ;;
		503) header retry-after >/dev/null || refused "POST /v1/sign"
			pause "the CA is unavailable" ;;
		*) refused "POST /v1/sign" ;;
		esac
	done
	got_chain
}

got_chain() {
	cp "$WORK/body" "$WORK/chain.pem"
	# Where to look for this CSR's newest chain later (kept when the answer names none).
	id=$(header csrproxy-certificate-id 2>/dev/null) && CERT_ID=$id
}

poll_order() {
	location=$(header location) || die "$EXIT_REFUSED" "the server answered 202 without a Location"
	order_url=$(same_origin_url "$location") || exit
	log "the order is taking a while; polling $location"
	while :; do
		if [ "$STATUS" = 200 ]; then
			case $(json_field status) in
			valid)
				cert=$(json_field certificate)
				[ -n "$cert" ] || cert="${location%/}/certificate"
				cert_url=$(same_origin_url "$cert") || exit
				http GET "$cert_url" || die "$EXIT_NETWORK" "$NETERR"
				[ "$STATUS" = 200 ] || refused "GET $cert_url"
				got_chain
				return
				;;
			invalid)
				die "$EXIT_REFUSED" "the order failed: $(problem_text)" ;;
			esac
		elif [ "$STATUS" != 202 ] && [ "$STATUS" != 429 ]; then
			refused "GET $location"
		fi
		pause "still processing" 1
		if ! http GET "$order_url"; then
			# The network failed; the order goes on: try again.
			warn "$NETERR; trying again"
			STATUS=202
			: >"$WORK/headers.last"
		fi
	done
}

# -- keys, CSRs, chains -------------------------------------------------------

make_key() { # TYPE OUT
	case $1 in
	ec256) set -- "$2" -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve ;;
	ec384) set -- "$2" -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -pkeyopt ec_param_enc:named_curve ;;
	rsa2048 | rsa3072 | rsa4096) set -- "$2" -algorithm RSA -pkeyopt "rsa_keygen_bits:${1#rsa}" ;;
	*) die "$EXIT_USAGE" "unknown key type $1" ;;
	esac
	out=$1
	shift
	openssl genpkey "$@" -out "$out" 2>"$WORK/err" || die "$EXIT_USAGE" "openssl genpkey: $(cat "$WORK/err")"
	chmod 600 "$out"
}

# ec256, ec384, rsa2048, ... for the key in $1 (what --key-type would have made), or "".
key_type_of() {
	openssl pkey -in "$1" -noout -text 2>/dev/null | awk '
		/^Private-Key: \(/ { bits = $2; sub(/^\(/, "", bits) }
		/^modulus:/ { kind = "rsa" }
		/^ASN1 OID:/ { kind = "ec" }
		END { if (kind != "" && bits != "") print kind bits }'
}

make_csr() { # KEY OUT NAMES...
	csr_key=$1 out=$2
	shift 2
	san='' cn=$1
	for n; do san="${san:+$san,}DNS:$n"; done
	# A CN holds at most 64 characters; the SANs are what counts.
	[ "${#cn}" -le 64 ] || cn=
	{
		printf '[req]\nprompt = no\ndistinguished_name = dn\nreq_extensions = ext\n[dn]\n'
		[ -n "$cn" ] && printf 'CN = %s\n' "$cn"
		printf '[ext]\nsubjectAltName = %s\n' "$san"
	} >"$WORK/req.cnf"
	if [ -n "$cn" ]; then
		openssl req -new -sha256 -key "$csr_key" -config "$WORK/req.cnf" -out "$out" 2>"$WORK/err"
	else
		openssl req -new -sha256 -key "$csr_key" -config "$WORK/req.cnf" -subj / -out "$out" 2>"$WORK/err"
	fi || die "$EXIT_USAGE" "openssl req: $(cat "$WORK/err")"
}

# What openssl says of the certificate $1, in the file $2 (one openssl run: it is the slow
# part): notBefore=, notAfter=, the public key PEM, then the text (with the SANs).
cert_facts() {
	openssl x509 -in "$1" -noout -startdate -enddate -pubkey -text >"$2" 2>/dev/null || : >"$2"
}

facts_pubkey() { sed -n '/^-----BEGIN PUBLIC KEY-----$/,/^-----END PUBLIC KEY-----$/p' "$1"; }

# The DNS names in the facts $1, sorted, one a line.
facts_names() {
	awk '/X509v3 Subject Alternative Name/ { getline; print; exit }' "$1" |
		tr ',' '\n' | sed -n 's/^[ 	]*DNS:\(.*\)$/\1/p' | tr '[:upper:]' '[:lower:]' | sort -u
}

# The facts $1's notBefore or notAfter ($2) in epoch seconds, or 0.
facts_time() {
	sed -n "s/^$2=//p" "$1" | awk '
	function days(y, m, d) { if (m <= 2) { y--; m += 12 }
		return 365 * y + int(y / 4) - int(y / 100) + int(y / 400) + int((153 * (m - 3) + 2) / 5) + d - 719469 }
	{ m = (index("JanFebMarAprMayJunJulAugSepOctNovDec", $1) + 2) / 3
	  split($3, t, ":"); print days($4, m, $2) * 86400 + t[1] * 3600 + t[2] * 60 + t[3]; found = 1 }
	END { if (!found) print 0 }'
}

# Split the chain in $1 into $WORK/cert.N.pem; prints how many.
split_chain() {
	awk -v dir="$WORK" '/-----BEGIN CERTIFICATE-----/ { n++; on = 1 }
		on { print > (dir "/cert." n ".pem") }
		/-----END CERTIFICATE-----/ { on = 0; close(dir "/cert." n ".pem") }
		END { print n + 0 }' "$1"
}

# Check the chain in $WORK/chain.pem for the key $1 and the names in $WANTED: the leaf's key
# is ours, its names are exactly those asked for, each certificate is signed by the next
# (the last by --root, when given) and all are valid now. Else fail, saying why in CHECK_ERR.
check_chain() {
	CHECK_ERR=''
	count=$(split_chain "$WORK/chain.pem")
	[ "$count" -ge 1 ] || { CHECK_ERR="the server's answer holds no certificate"; return 1; }
	leaf=$WORK/cert.1.pem
	openssl pkey -in "$1" -pubout 2>/dev/null >"$WORK/want.pub"
	cert_facts "$leaf" "$WORK/new.facts"
	facts_pubkey "$WORK/new.facts" >"$WORK/got.pub"
	cmp -s "$WORK/want.pub" "$WORK/got.pub" || { CHECK_ERR="the certificate is not for this key"; return 1; }
	facts_names "$WORK/new.facts" >"$WORK/got.names"
	# shellcheck disable=SC2086 # the names are one word each
	printf '%s\n' $WANTED | tr '[:upper:]' '[:lower:]' | sort -u >"$WORK/want.names"
	if ! cmp -s "$WORK/want.names" "$WORK/got.names"; then
		CHECK_ERR="the certificate names $(tr '\n' ' ' <"$WORK/got.names")instead of $WANTED"
		return 1
	fi
	cp "$leaf" "$WORK/full.pem"
	: >"$WORK/untrusted.pem"
	i=2
	while [ "$i" -le "$count" ]; do
		cat "$WORK/cert.$i.pem" >>"$WORK/untrusted.pem"
		cat "$WORK/cert.$i.pem" >>"$WORK/full.pem"
		i=$((i + 1))
	done
	if [ -n "$ROOT" ]; then
		set -- -CAfile "$ROOT"
	elif [ "$count" -ge 2 ]; then
		set -- -partial_chain -CAfile "$WORK/cert.$count.pem"
	else
		set --
	fi
	if [ "$#" -gt 0 ]; then
		[ "$count" -ge 2 ] && set -- "$@" -untrusted "$WORK/untrusted.pem"
		# Old openssl verify exits 0 whatever happened: its ": OK" is the answer.
		out=$(openssl verify "$@" "$leaf" 2>&1) || out="$out (failed)"
		case $out in
		*": OK") ;;
		*) CHECK_ERR="the chain does not verify: $(printf '%s' "$out" | tr '\n' ' ')"; return 1 ;;
		esac
	fi
	t=$(now)
	if [ "$(facts_time "$WORK/new.facts" notAfter)" -le "$t" ]; then
		CHECK_ERR="the certificate has expired"
		return 1
	fi
	if [ "$(facts_time "$WORK/new.facts" notBefore)" -gt "$((t + 300))" ]; then
		CHECK_ERR="the certificate is not valid yet"
		return 1
	fi
}

# -- the directory --------------------------------------------------------------

# Replace DIR/NAME with FILE atomically in mode MODE: a copy beside it, fsynced, renamed.
put() { # FILE NAME MODE
	tmp="$DIR/.$2.$$.tmp"
	rm -f "$tmp"
	if ! { cp "$1" "$tmp" && chmod "$3" "$tmp" && flush "$tmp" && mv -f "$tmp" "$DIR/$2"; }; then
		rm -f "$tmp"
		die "$EXIT_USAGE" "cannot write $DIR/$2"
	fi
}

# Install the checked chain (and a new key, when $NEWKEY is set) and the state, in this
# order: chain.pem, key.pem, cert.pem, csrproxy.state (cert.pem always holds its own chain).
install_files() {
	put "$WORK/untrusted.pem" chain.pem 644
	[ -n "$NEWKEY" ] && put "$NEWKEY" key.pem 600
	put "$WORK/full.pem" cert.pem 644
	write_state
	flush "$DIR"
}

write_state() {
	{
		echo "# csrproxy-client.sh state: what renew needs (no token in it)"
		echo "version=1"
		echo "url=$BASE"
		echo "names=$WANTED"
		echo "discover_names=$DISCOVER"
		echo "key_type=$KEY_TYPE"
		echo "token_file=$TOKEN_FILE"
		echo "ca_file=$CA_FILE"
		echo "root=$ROOT"
		echo "insecure=$INSECURE"
		echo "async=$ASYNC"
		echo "timeout=$TIMEOUT"
		echo "certificate_id=$CERT_ID"
	} >"$WORK/state"
	put "$WORK/state" "$STATE_FILE" 600
}

state() { sed -n "s/^$1=//p" "$DIR/$STATE_FILE" | head -n 1; }

# Hold DIR's lock (mkdir is atomic) until exit, waiting for another run until the deadline;
# a lock whose run is gone (its pid not alive) is taken over.
lock() {
	while ! mkdir "$DIR/$LOCK_DIR" 2>/dev/null; do
		[ -h "$DIR/$LOCK_DIR" ] && die "$EXIT_USAGE" "$DIR/$LOCK_DIR is a symbolic link; remove it"
		holder=$(cat "$DIR/$LOCK_DIR/pid" 2>/dev/null)
		if is_number "$holder" && ! kill -0 "$holder" 2>/dev/null; then
			warn "taking over the lock of run $holder, which is gone"
			rm -rf "${DIR:?}/$LOCK_DIR"
			continue
		fi
		[ "$(now)" -lt "$DEADLINE" ] ||
			die "$EXIT_NETWORK" "another run holds $DIR/$LOCK_DIR (pid ${holder:-?}); run again later"
		debug "waiting for run ${holder:-?} (the lock $DIR/$LOCK_DIR)"
		sleep 1
	done
	WORK=$DIR/$LOCK_DIR
	# A run cut short leaves neither its lock nor a temporary file (put's) behind.
	trap 'rm -rf "$WORK"; for f in chain.pem key.pem cert.pem "$STATE_FILE"; do rm -f "$DIR/.$f.$$.tmp"; done' EXIT
	trap 'exit 129' HUP
	trap 'exit 130' INT
	trap 'exit 143' TERM
	echo $$ >"$WORK/pid"
}

# -- the commands ---------------------------------------------------------------

# Sign a CSR for $WANTED with KEY and check the answer into $WORK/chain.pem.
obtain() { # KEY
	log "asking for $WANTED"
	# shellcheck disable=SC2086 # the names are one word each
	make_csr "$1" "$WORK/req.csr" $WANTED
	sign "$WORK/req.csr"
	check_chain "$1" || die "$EXIT_REFUSED" "$CHECK_ERR"
}

read_token() {
	TOKEN=
	[ -n "$TOKEN_FILE" ] || return 0
	[ -r "$TOKEN_FILE" ] || die "$EXIT_USAGE" "cannot read the token file $TOKEN_FILE"
	TOKEN=$(tr -d ' \t\r\n' <"$TOKEN_FILE") || die "$EXIT_USAGE" "cannot read the token file $TOKEN_FILE"
	[ -n "$TOKEN" ] || die "$EXIT_USAGE" "the token file $TOKEN_FILE is empty"
	# shellcheck disable=SC2012
	case $(ls -ld "$TOKEN_FILE" | cut -c8) in
	r) warn "the token file $TOKEN_FILE is readable by everyone" ;;
	esac
}

set_server() { # URL
	BASE=${1%/}
	BASE=${BASE%/v1/sign}
	BASE=${BASE%/}
	ORIGIN=$(origin_of "$BASE") || die "$EXIT_USAGE" "--url $1 is not an http(s) URL"
	case $BASE in
	*://*/*) BASE_ORIGIN_URL=${BASE%"${BASE#*://*/}"}; BASE_ORIGIN_URL=${BASE_ORIGIN_URL%/} ;;
	*) BASE_ORIGIN_URL=$BASE ;;
	esac
	if [ -n "$TOKEN" ] && [ "${ORIGIN%%://*}" != https ] && [ "$INSECURE" != 1 ]; then
		die "$EXIT_USAGE" "refusing to send the bearer token in the clear to $BASE: use an" \
			"https:// URL, or --insecure on a network you trust"
	fi
}

# Whether the certificate in DIR should be renewed now, and why (in WHY): missing, not
# matching key.pem, forced, or less than a third of its lifetime left.
due() {
	cert=$DIR/cert.pem
	WHY="no certificate"
	[ -f "$cert" ] || return 0
	cert_facts "$cert" "$WORK/cur.facts"
	facts_pubkey "$WORK/cur.facts" >"$WORK/cur.pub"
	openssl pkey -in "$DIR/key.pem" -pubout 2>/dev/null >"$WORK/key.pub" ||
		die "$EXIT_USAGE" "cannot read the key $DIR/key.pem"
	WHY="cert.pem does not match key.pem"
	cmp -s "$WORK/cur.pub" "$WORK/key.pub" || return 0
	before=$(facts_time "$WORK/cur.facts" notBefore)
	after=$(facts_time "$WORK/cur.facts" notAfter)
	t=$(now)
	life=$((after - before))
	WHY="$(((after - t) / 3600)) hours left of $((life / 3600))"
	[ $((3 * (after - t))) -lt "$life" ] && return 0
	[ "$FORCE" = 1 ] && WHY="--force" && return 0
	[ -n "$NEWKEY" ] && WHY="--rotate-key" && return 0
	WHY="not due: $WHY"
	return 1
}

summary() {
	[ "$VERBOSITY" -ge 1 ] || return 0
	printf 'names:   %s\n' "$WANTED"
	printf 'issuer:  %s\n' "$(sed -n 's/^ *Issuer: *//p' "$WORK/new.facts" | head -n 1)"
	printf 'valid:   %s to %s\n' "$(sed -n 's/^notBefore=//p' "$WORK/new.facts")" \
		"$(sed -n 's/^notAfter=//p' "$WORK/new.facts")"
	printf 'certificate: %s\n' "${CERT_ID:-(the server gave no id)}"
	printf 'key:     %s\nchain:   %s/cert.pem (leaf + chain), %s/chain.pem\n' "$DIR/key.pem" "$DIR" "$DIR"
}

cmd_issue() {
	[ -n "$URL" ] || die "$EXIT_USAGE" "issue needs --url"
	DISCOVER=0
	[ -n "$NAMES" ] || DISCOVER=1
	read_token
	set_server "$URL"
	[ -d "$DIR" ] || mkdir -p "$DIR" 2>/dev/null
	[ -d "$DIR" ] || die "$EXIT_USAGE" "cannot make the directory $DIR"
	check_dir
	lock
	NEWKEY=
	if [ -f "$DIR/key.pem" ] && [ "$ROTATE" != 1 ]; then
		key=$DIR/key.pem
		KEY_TYPE=$(key_type_of "$key")
		[ -n "$KEY_TYPE" ] || die "$EXIT_USAGE" "cannot read the key $key"
	else
		make_key "$KEY_TYPE" "$WORK/new.key"
		log "made a new $KEY_TYPE key"
		if [ -f "$DIR/key.pem" ] && [ -f "$DIR/cert.pem" ]; then
			NEWKEY=$WORK/new.key # rotation: key.pem changes with cert.pem, not before
		else
			put "$WORK/new.key" key.pem 600
		fi
		key=$WORK/new.key
	fi
	WANTED=$NAMES
	if [ "$DISCOVER" = 1 ]; then
		server_names "$key"
		WANTED=$FOUND
		[ -n "$WANTED" ] || die "$EXIT_USAGE" "the server's policy gives this key no name of its own; give --name"
	fi
	CERT_ID=
	obtain "$key"
	install_files
	summary
}

# Whether the server holds a newer chain for the certificate id than cert.pem (same key and
# names, checked, ending later): the daemon renews what it issued on its own. It is then in
# $WORK as for obtain. A failed look-up is a warning: it matters only when cert.pem is due.
fetch_newer() {
	case $CERT_ID in '' | *[!0-9a-f]*) return 1 ;; esac
	[ -f "$DIR/cert.pem" ] || return 1
	if ! http GET "$BASE/v1/certificates/$CERT_ID"; then
		warn "the server's newest certificate: $NETERR"
		return 1
	fi
	if [ "$STATUS" != 200 ]; then
		warn "the server's newest certificate: $STATUS $(problem_text)"
		return 1
	fi
	got_chain
	if ! check_chain "$DIR/key.pem"; then
		warn "the server's newest certificate: $CHECK_ERR"
		return 1
	fi
	cert_facts "$DIR/cert.pem" "$WORK/cur.facts"
	[ "$(facts_time "$WORK/new.facts" notAfter)" -gt "$(facts_time "$WORK/cur.facts" notAfter)" ]
}

cmd_renew() {
	check_dir
	[ -f "$DIR/$STATE_FILE" ] || die "$EXIT_USAGE" "no $DIR/$STATE_FILE: run issue first"
	refuse_writable "$DIR/$STATE_FILE" "the file"
	[ -f "$DIR/key.pem" ] || die "$EXIT_USAGE" "no $DIR/key.pem: run issue first"
	# The state's settings; the command line's override them.
	[ -n "$URL" ] || URL=$(state url)
	[ -n "$NAMES" ] || NAMES=$(state names)
	DISCOVER=$(state discover_names)
	KEY_TYPE=${KEY_TYPE_SET:-$(state key_type)}
	[ -n "$TOKEN_FILE" ] || TOKEN_FILE=$(state token_file)
	[ -n "$CA_FILE" ] || CA_FILE=$(state ca_file)
	[ -n "$ROOT" ] || ROOT=$(state root)
	[ "$INSECURE" = 1 ] || INSECURE=$(state insecure)
	[ "$ASYNC" = 1 ] || ASYNC=$(state async)
	[ -n "$TIMEOUT_SET" ] || { TIMEOUT=$(state timeout); is_number "$TIMEOUT" || TIMEOUT=600; }
	DEADLINE=$(($(now) + TIMEOUT))
	CERT_ID=$(state certificate_id)
	[ -n "$URL" ] || die "$EXIT_USAGE" "$DIR/$STATE_FILE names no url"
	[ -z "$ROOT" ] || [ -r "$ROOT" ] || die "$EXIT_USAGE" "cannot read the root file $ROOT"
	[ -z "$CA_FILE" ] || [ -r "$CA_FILE" ] || die "$EXIT_USAGE" "cannot read the CA file $CA_FILE"
	read_token
	set_server "$URL"
	lock
	NEWKEY=
	key=$DIR/key.pem
	if [ "$ROTATE" = 1 ]; then
		make_key "${KEY_TYPE:-ec256}" "$WORK/new.key"
		NEWKEY=$WORK/new.key
		key=$NEWKEY
	fi
	WANTED=$NAMES
	if [ -z "$NEWKEY" ] && fetch_newer; then
		action="fetched-newer: the server has a newer certificate"
	elif ! due; then
		log "unchanged: $WHY"
		return 0
	else
		action="reissued: $WHY"
		log "renewing: $WHY"
		if [ "$DISCOVER" = 1 ]; then
			server_names "$key"
			[ -n "$FOUND" ] && WANTED=$FOUND
		fi
		[ -n "$WANTED" ] || die "$EXIT_USAGE" "$DIR/$STATE_FILE names no name"
		obtain "$key"
		if [ -z "$NEWKEY" ] && [ -f "$DIR/cert.pem" ] && cmp -s "$WORK/full.pem" "$DIR/cert.pem"; then
			log "unchanged: ${action#reissued: }; the server answered the same certificate"
			write_state
			return 0
		fi
	fi
	install_files
	log "$action (valid until $(sed -n 's/^notAfter=//p' "$WORK/new.facts"))"
	if [ -n "$RELOAD" ]; then
		log "running $RELOAD"
		sh -c "$RELOAD" || {
			rc=$?
			die "$EXIT_RELOAD" "the certificate changed but the reload failed: '$RELOAD' exited with $rc"
		}
	fi
}

check_dir() {
	[ -d "$DIR" ] || die "$EXIT_USAGE" "no directory $DIR"
	[ -h "$DIR/key.pem" ] && die "$EXIT_USAGE" "$DIR/key.pem is a symbolic link: $PROG follows no link in its directory; remove it"
	[ -h "$DIR/$STATE_FILE" ] && die "$EXIT_USAGE" "$DIR/$STATE_FILE is a symbolic link: $PROG follows no link in its directory; remove it"
	refuse_writable "$DIR" "the directory"
	[ -f "$DIR/key.pem" ] && refuse_writable "$DIR/key.pem" "the file"
	return 0
}

# -- the command line -----------------------------------------------------------

need_arg() { [ "$2" -ge 2 ] || die "$EXIT_USAGE" "$1 needs a value"; }

main() {
	umask 077
	[ "$#" -ge 1 ] || die "$EXIT_USAGE" "issue or renew? (see --help)"
	COMMAND=$1
	case $COMMAND in
	issue | renew) shift ;;
	-h | --help) usage; exit "$EXIT_OK" ;;
	*) die "$EXIT_USAGE" "unknown command $COMMAND: issue or renew (see --help)" ;;
	esac
	DIR='' URL='' NAMES='' KEY_TYPE=ec256 KEY_TYPE_SET='' ROTATE=0 TOKEN_FILE='' CA_FILE='' ROOT=''
	INSECURE=0 ASYNC=0 TIMEOUT=600 TIMEOUT_SET='' FORCE=0 RELOAD='' TOKEN=''
	while [ "$#" -gt 0 ]; do
		case $1 in
		--dir) need_arg "$1" "$#"; DIR=$2; shift ;;
		--url) need_arg "$1" "$#"; URL=$2; shift ;;
		--name) need_arg "$1" "$#"
			case $2 in '' | *[!A-Za-z0-9.-]*) die "$EXIT_USAGE" "--name $2 is not a DNS name (A-labels)" ;; esac
			NAMES="${NAMES:+$NAMES }$2"; shift ;;
		--key-type) need_arg "$1" "$#"
			case $2 in ec256 | ec384 | rsa2048 | rsa3072 | rsa4096) ;; *) die "$EXIT_USAGE" "unknown key type $2" ;; esac
			KEY_TYPE=$2 KEY_TYPE_SET=$2; shift ;;
		--rotate-key | --new-key) ROTATE=1 ;;
		--token-file) need_arg "$1" "$#"; TOKEN_FILE=$(absolute "$2"); shift ;;
		--ca-file | --cacert) need_arg "$1" "$#"; CA_FILE=$(absolute "$2"); shift ;;
		--root) need_arg "$1" "$#"; ROOT=$(absolute "$2"); shift ;;
		--insecure) INSECURE=1 ;;
		--async) ASYNC=1 ;;
		--timeout) need_arg "$1" "$#"
			{ is_number "$2" && [ "$2" -gt 0 ]; } || die "$EXIT_USAGE" "--timeout must be a positive number of seconds"
			TIMEOUT=$2 TIMEOUT_SET=1; shift ;;
		--force) FORCE=1 ;;
		--reload-command) need_arg "$1" "$#"; RELOAD=$2; shift ;;
		-q | --quiet) VERBOSITY=0 ;;
		-v | --verbose) VERBOSITY=2 ;;
		-h | --help) usage; exit "$EXIT_OK" ;;
		*) die "$EXIT_USAGE" "unknown option $1 (see --help)" ;;
		esac
		shift
	done
	[ -n "$DIR" ] || die "$EXIT_USAGE" "--dir is needed"
	DIR=$(absolute "$DIR")
	DIR=${DIR%/}
	for f in "$DIR" "$TOKEN_FILE" "$CA_FILE" "$ROOT"; do
		case $f in *'
'*) die "$EXIT_USAGE" "a path with a newline in it: $f" ;;
		esac
	done
	[ -z "$ROOT" ] || [ -r "$ROOT" ] || die "$EXIT_USAGE" "cannot read the root file $ROOT"
	[ -z "$CA_FILE" ] || [ -r "$CA_FILE" ] || die "$EXIT_USAGE" "cannot read the CA file $CA_FILE"
	command -v openssl >/dev/null 2>&1 || die "$EXIT_USAGE" "openssl is not installed"
	command -v curl >/dev/null 2>&1 || die "$EXIT_USAGE" "curl is not installed"
	DEADLINE=$(($(now) + TIMEOUT))
	case $COMMAND in
	issue) cmd_issue ;;
	renew) cmd_renew ;;
	esac
}

main "$@"
