# Runs the package's checks; writes a JUnit file beside the others; fails when one fails.
pkg=$1
. ./main.sh
results=/workspace/build/test-results
mkdir -p "$results"
got=$(greet ci)
if [ "$got" = "hello, ci" ]; then
  echo "<testsuite name=\"$pkg\" tests=\"1\" failures=\"0\"><testcase classname=\"$pkg\" name=\"greets\"/></testsuite>" > "$results/$pkg.xml"
  echo "$pkg: 1 test, 0 failed"
else
  echo "<testsuite name=\"$pkg\" tests=\"1\" failures=\"1\"><testcase classname=\"$pkg\" name=\"greets\"><failure message=\"got $got\"/></testcase></testsuite>" > "$results/$pkg.xml"
  exit 1
fi
