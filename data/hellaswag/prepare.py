"""
HellaSwag's validation split (10,042 items), which train.py scores with --hellaswag=True (hellaswag.py).
Writes hellaswag_val.jsonl, the HellaSwag authors' file as it is, next to this script.
$ python data/hellaswag/prepare.py                                # downloads it
$ python data/hellaswag/prepare.py --input=hellaswag_val.jsonl   # a copy you have
"""
import os
import sys
import shutil
import argparse
import urllib.request

# the repository root, for hellaswag.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hellaswag import read_items

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--input', help="a local copy of hellaswag_val.jsonl; default: download it")
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)),
                    help="where hellaswag_val.jsonl goes")
args = parser.parse_args()

if args.input is not None and not os.path.isfile(args.input):
    sys.exit(f"error: no file {args.input} for --input: give the path of hellaswag_val.jsonl")
path = os.path.join(args.out_dir, 'hellaswag_val.jsonl')
tmp = path + '.tmp'  # written and checked, then renamed: a failure leaves no partial or foreign file
try:
    if args.input is None:
        print(f"downloading {URL} to {path}")
        os.makedirs(args.out_dir, exist_ok=True)
        urllib.request.urlretrieve(URL, tmp)
    items = read_items(args.input or tmp)
except (OSError, ValueError) as e:
    if os.path.exists(tmp):
        os.remove(tmp)
    if isinstance(e, ValueError):
        sys.exit(f"error: {str(e).replace(tmp, URL)}")
    sys.exit(f"error: cannot {'read ' + args.input if args.input else 'download ' + URL} "
             f"({getattr(e, 'reason', e)}): download it yourself and pass --input=<path>")
if args.input is not None:
    os.makedirs(args.out_dir, exist_ok=True)
    shutil.copyfile(args.input, tmp)
os.replace(tmp, path)
print(f"{path}: {len(items):,} items")
