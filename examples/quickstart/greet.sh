#!/bin/sh
echo "${GREETING:-hi}, ${1:-you}!"
