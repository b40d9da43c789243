# The cli package: greets whoever it is given.
greet() { echo "hello, ${1:-world}"; }
