# Runs the package's checks; writes a JUnit file beside the others; fails when one fails.
pkg=$1
. ./lib.sh
results=/workspace/build/test-results
cases="" failures=0 count=0
check() { # NAME EXPECTED COMMAND...
  name=$1 expected=$2
  shift 2
  got=$("$@")
  count=$((count + 1))
  if [ "$got" = "$expected" ]; then
    cases="$cases<testcase classname=\"$pkg\" name=\"$name\"/>"
  else
    failures=$((failures + 1))
    cases="$cases<testcase classname=\"$pkg\" name=\"$name\"><failure message=\"expected $expected, got $got\"/></testcase>"
    echo "FAIL $name: expected $expected, got $got"
  fi
}
check adds 5 add 2 3
check doubles 8 double 4
mkdir -p "$results"
echo "<testsuite name=\"$pkg\" tests=\"$count\" failures=\"$failures\">$cases</testsuite>" > "$results/$pkg.xml"
echo "$pkg: $count tests, $failures failed"
[ "$failures" -eq 0 ]
