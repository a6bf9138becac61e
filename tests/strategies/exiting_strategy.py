"""A user strategy module that ends the process as it is imported."""

import sys

sys.exit("this module is a script")
