#!/bin/bash
# make indent / make typedefs: format the C sources as pgindent formats
# PostgreSQL's, and keep the list of type names it needs.
#
#   test/tools/indent.sh indent FILE...    reformat FILEs in place
#   test/tools/indent.sh typedefs FILE...  print the typedef names that FILEs
#                                          use (compiled with -g; cflags from
#                                          $TYPEDEF_CFLAGS), one a line
#
# pg_bsd_indent does the formatting, with pgindent's options; the typedefs
# list tells it which words are types (without it, "Datum *x" is taken for a
# multiplication).  pgindent itself is not installed with PostgreSQL, so
# what it adds around pg_bsd_indent is done here: dash-protected comments
# kept as written, a tab between run-together comments, one space before
# the '*' of a return type on a line of its own.
#
# pg_bsd_indent 2.1 is the Debian package pg-bsd-indent; PostgreSQL 16 and
# later also ship its source under src/tools/pg_bsd_indent.
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
typedefs_list="$here/src/typedefs.list"
indent=${PG_BSD_INDENT:-pg_bsd_indent}
# src/tools/pgindent/pgindent's options
indent_options=(-bad -bap -bbb -bc -bl -cli1 -cp33 -cdb -nce -d0 -di12 -nfc1
	-i4 -l79 -lp -lpl -nip -npro -sac -tpg -ts4)

reformat() {
	if ! command -v "$indent" >/dev/null; then
		echo "indent.sh: $indent not found: apt-get install pg-bsd-indent," \
			"or build src/tools/pg_bsd_indent of PostgreSQL 16+ and set PG_BSD_INDENT" >&2
		exit 1
	fi
	local f formatted
	formatted=$(mktemp)
	trap 'rm -f "$formatted"' RETURN
	for f in "$@"; do
		perl -pi -e 's!/\* +---!/*---X_X!g' "$f"
		# with an output file named, pg_bsd_indent leaves no .BAK behind
		"$indent" "${indent_options[@]}" "-U$typedefs_list" "$f" "$formatted"
		cat "$formatted" >"$f"
		perl -pi -e 's!/\*---X_X!/* ---!g; s!\*/(/\*.*\*/)$!*/\t$1!; s!^([A-Za-z_]\S*)[ \t]+\*$!$1 *!' "$f"
	done
}

# DWARF names every typedef a translation unit uses, PostgreSQL's included;
# the typedefs a file declares but never uses are read from its text.
list_typedefs() {
	local work f
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	for f in "$@"; do
		case "$f" in
			*.c)
				# shellcheck disable=SC2086 # TYPEDEF_CFLAGS is a list of flags
				gcc -g -c -o "$work/unit.o" ${TYPEDEF_CFLAGS:-} "$f"
				objdump -W "$work/unit.o" |
					awk '/DW_TAG_typedef/ { t = 1; next }
						t && /DW_AT_name/ { print $NF; t = 0 }
						/DW_TAG/ { t = 0 }'
				;;
		esac
		# "typedef struct X X;", "typedef enum {...} X;", "typedef void (*X) (...);"
		perl -ne 'print "$1\n" if /^typedef\b.*?\(?\*?\s*(\w+)\)?\s*(?:\([^;]*\))?;\s*$/ || /^\}\s*(\w+);/' "$f"
	done
	echo bool
}

case "${1:-}" in
	indent) shift; reformat "$@" ;;
	typedefs) shift; list_typedefs "$@" | sort -u ;;
	*) echo "usage: $0 indent|typedefs FILE..." >&2; exit 2 ;;
esac
