# The core package: arithmetic for the command line.
add() { echo $(($1 + $2)); }
double() { add "$1" "$1"; }
