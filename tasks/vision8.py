"""The eight image-classification tasks of the task-arithmetic benchmark, read from local disk.

SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD, registered as ``sun397``,
``cars``, ``resisc45``, ``eurosat``, ``svhn``, ``gtsrb``, ``mnist`` and ``dtd``. Nothing is
downloaded: every factory reads ``data_root`` and fails with a :class:`TaskDataError` that names
the missing folder or file and the layout it expected.

Class names and text templates are those of the task_vectors code (mlfoundations/task_vectors,
``src/datasets``), so zero-shot heads built here match the published ``head_<Dataset>.pt``.

Layouts, tried in this order (folder names under ``data_root`` match case-insensitively: the
exact spelling first, else the first of the variants in code-point order, ``EUROSAT`` before
``EuroSAT``):

1. ImageFolder, any task: ``<root>/<dir>/train/<class>/<image>`` and ``<root>/<dir>/test/...``,
   where ``<dir>`` is one of the names in ``_Spec.dirs`` (e.g. ``dtd``, ``EuroSAT_splits``,
   ``stanford_cars_folder_based``). task_vectors' DTD and SUN397 exports have ``val/`` instead
   of ``test/`` and evaluate on it, so ``val/`` is read as the *test* split when there is no
   ``test/``. Images: any extension in ``torchvision.datasets.folder.IMG_EXTENSIONS``.
2. Native formats (what task_vectors and torchvision read, parsed here without torchvision's
   download/md5 machinery):
   - mnist: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``.gz``);
   - svhn: ``<root>/svhn/{train,test}_32x32.mat`` (label 10 means digit 0);
   - gtsrb: ``<root>/gtsrb/GTSRB/Training/<class>/*.ppm``, ``<root>/gtsrb/GTSRB/Final_Test/
     Images/*.ppm`` and ``<root>/gtsrb/GT-final_test.csv``;
   - cars: ``<root>/stanford_cars/{devkit/cars_train_annos.mat, cars_train/,
     cars_test_annos_withlabels.mat, cars_test/}`` (class ids 1-based, devkit order);
   - resisc45: ``<root>/resisc45/NWPU-RESISC45/<class>/*.jpg`` with the split lists
     ``<root>/resisc45/resisc45-{train,test}.txt``.

Folder-to-class matching (ImageFolder and class-folder native layouts): the number of class
folders must equal the task's class count, else an error names both counts. Then, if every
folder name matches a distinct canonical class by name (case, spaces, ``_``, ``-`` and ``/``
ignored; also the dataset's raw folder names such as EuroSAT's ``AnnualCrop``, and SUN397's
``a_abbey`` style), labels follow the names. If no folder name matches a class, the folder
names, sorted (digit runs numerically, e.g. GTSRB's ``00000``..``00042`` or ``class_0``..``class_42``),
map in order onto the canonical list. Some folders matching and some not is an error naming the others
(by position, the matched ones would be relabelled too).

Validation: ``val`` is carved from the train split exactly as task_vectors does
(``random_split`` of the train set into ``[n - v, v]`` with ``v = min(int(n * val_fraction),
val_cap)`` and a generator seeded with 0); ``train`` is the remainder, so the two are disjoint
and ``val`` never touches ``test``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import inspect
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset

from harness.errors import did_you_mean
from tasks.base import CLIP_MEAN, CLIP_STD, SPLITS, Task, TaskDataError, register_task, tensors_digest

VAL_SEED = 0

# ---------------------------------------------------------------------------------------------
# Class names and templates (task_vectors, src/datasets/*.py and templates.py)
# ---------------------------------------------------------------------------------------------

_DIGITS = tuple(str(i) for i in range(10))

_SUN397 = (
    "abbey", "airplane cabin", "airport terminal", "alley", "amphitheater", "amusement arcade",
    "amusement park", "anechoic chamber", "apartment building outdoor", "apse indoor",
    "aquarium", "aqueduct", "arch", "archive", "arrival gate outdoor", "art gallery",
    "art school", "art studio", "assembly line", "athletic field outdoor", "atrium public",
    "attic", "auditorium", "auto factory", "badlands", "badminton court indoor",
    "baggage claim", "bakery shop", "balcony exterior", "balcony interior", "ball pit",
    "ballroom", "bamboo forest", "banquet hall", "bar", "barn", "barndoor", "baseball field",
    "basement", "basilica", "basketball court outdoor", "bathroom", "batters box", "bayou",
    "bazaar indoor", "bazaar outdoor", "beach", "beauty salon", "bedroom", "berth",
    "biology laboratory", "bistro indoor", "boardwalk", "boat deck", "boathouse", "bookstore",
    "booth indoor", "botanical garden", "bow window indoor", "bow window outdoor",
    "bowling alley", "boxing ring", "brewery indoor", "bridge", "building facade", "bullring",
    "burial chamber", "bus interior", "butchers shop", "butte", "cabin outdoor", "cafeteria",
    "campsite", "campus", "canal natural", "canal urban", "candy store", "canyon",
    "car interior backseat", "car interior frontseat", "carrousel", "casino indoor", "castle",
    "catacomb", "cathedral indoor", "cathedral outdoor", "cavern indoor", "cemetery", "chalet",
    "cheese factory", "chemistry lab", "chicken coop indoor", "chicken coop outdoor",
    "childs room", "church indoor", "church outdoor", "classroom", "clean room", "cliff",
    "cloister indoor", "closet", "clothing store", "coast", "cockpit", "coffee shop",
    "computer room", "conference center", "conference room", "construction site",
    "control room", "control tower outdoor", "corn field", "corral", "corridor",
    "cottage garden", "courthouse", "courtroom", "courtyard", "covered bridge exterior",
    "creek", "crevasse", "crosswalk", "cubicle office", "dam", "delicatessen",
    "dentists office", "desert sand", "desert vegetation", "diner indoor", "diner outdoor",
    "dinette home", "dinette vehicle", "dining car", "dining room", "discotheque", "dock",
    "doorway outdoor", "dorm room", "driveway", "driving range outdoor", "drugstore",
    "electrical substation", "elevator door", "elevator interior", "elevator shaft",
    "engine room", "escalator indoor", "excavation", "factory indoor", "fairway",
    "fastfood restaurant", "field cultivated", "field wild", "fire escape", "fire station",
    "firing range indoor", "fishpond", "florist shop indoor", "food court", "forest broadleaf",
    "forest needleleaf", "forest path", "forest road", "formal garden", "fountain", "galley",
    "game room", "garage indoor", "garbage dump", "gas station", "gazebo exterior",
    "general store indoor", "general store outdoor", "gift shop", "golf course",
    "greenhouse indoor", "greenhouse outdoor", "gymnasium indoor", "hangar indoor",
    "hangar outdoor", "harbor", "hayfield", "heliport", "herb garden", "highway", "hill",
    "home office", "hospital", "hospital room", "hot spring", "hot tub outdoor",
    "hotel outdoor", "hotel room", "house", "hunting lodge outdoor", "ice cream parlor",
    "ice floe", "ice shelf", "ice skating rink indoor", "ice skating rink outdoor", "iceberg",
    "igloo", "industrial area", "inn outdoor", "islet", "jacuzzi indoor", "jail cell",
    "jail indoor", "jewelry shop", "kasbah", "kennel indoor", "kennel outdoor",
    "kindergarden classroom", "kitchen", "kitchenette", "labyrinth outdoor", "lake natural",
    "landfill", "landing deck", "laundromat", "lecture room", "library indoor",
    "library outdoor", "lido deck outdoor", "lift bridge", "lighthouse", "limousine interior",
    "living room", "lobby", "lock chamber", "locker room", "mansion", "manufactured home",
    "market indoor", "market outdoor", "marsh", "martial arts gym", "mausoleum", "medina",
    "moat water", "monastery outdoor", "mosque indoor", "mosque outdoor", "motel", "mountain",
    "mountain snowy", "movie theater indoor", "museum indoor", "music store", "music studio",
    "nuclear power plant outdoor", "nursery", "oast house", "observatory outdoor", "ocean",
    "office", "office building", "oil refinery outdoor", "oilrig", "operating room", "orchard",
    "outhouse outdoor", "pagoda", "palace", "pantry", "park", "parking garage indoor",
    "parking garage outdoor", "parking lot", "parlor", "pasture", "patio", "pavilion",
    "pharmacy", "phone booth", "physics laboratory", "picnic area", "pilothouse indoor",
    "planetarium outdoor", "playground", "playroom", "plaza", "podium indoor",
    "podium outdoor", "pond", "poolroom establishment", "poolroom home", "power plant outdoor",
    "promenade deck", "pub indoor", "pulpit", "putting green", "racecourse", "raceway", "raft",
    "railroad track", "rainforest", "reception", "recreation room", "residential neighborhood",
    "restaurant", "restaurant kitchen", "restaurant patio", "rice paddy", "riding arena",
    "river", "rock arch", "rope bridge", "ruin", "runway", "sandbar", "sandbox", "sauna",
    "schoolhouse", "sea cliff", "server room", "shed", "shoe shop", "shopfront",
    "shopping mall indoor", "shower", "skatepark", "ski lodge", "ski resort", "ski slope",
    "sky", "skyscraper", "slum", "snowfield", "squash court", "stable", "stadium baseball",
    "stadium football", "stage indoor", "staircase", "street", "subway interior",
    "subway station platform", "supermarket", "sushi bar", "swamp", "swimming pool indoor",
    "swimming pool outdoor", "synagogue indoor", "synagogue outdoor", "television studio",
    "temple east asia", "temple south asia", "tennis court indoor", "tennis court outdoor",
    "tent outdoor", "theater indoor procenium", "theater indoor seats", "thriftshop",
    "throne room", "ticket booth", "toll plaza", "topiary garden", "tower", "toyshop",
    "track outdoor", "train railway", "train station platform", "tree farm", "tree house",
    "trench", "underwater coral reef", "utility room", "valley", "van interior",
    "vegetable garden", "veranda", "veterinarians office", "viaduct", "videostore", "village",
    "vineyard", "volcano", "volleyball court indoor", "volleyball court outdoor",
    "waiting room", "warehouse indoor", "water tower", "waterfall block", "waterfall fan",
    "waterfall plunge", "watering hole", "wave", "wet bar", "wheat field", "wind farm",
    "windmill", "wine cellar barrel storage", "wine cellar bottle storage",
    "wrestling ring indoor", "yard", "youth hostel",
)

# Stanford Cars in devkit (cars_meta.mat) order, which is the label order task_vectors used.
_CARS = (
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
    "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
    "Acura ZDX Hatchback 2012", "Aston Martin V8 Vantage Convertible 2012",
    "Aston Martin V8 Vantage Coupe 2012", "Aston Martin Virage Convertible 2012",
    "Aston Martin Virage Coupe 2012", "Audi RS 4 Convertible 2008", "Audi A5 Coupe 2012",
    "Audi TTS Coupe 2012", "Audi R8 Coupe 2012", "Audi V8 Sedan 1994", "Audi 100 Sedan 1994",
    "Audi 100 Wagon 1994", "Audi TT Hatchback 2011", "Audi S6 Sedan 2011",
    "Audi S5 Convertible 2012", "Audi S5 Coupe 2012", "Audi S4 Sedan 2012",
    "Audi S4 Sedan 2007", "Audi TT RS Coupe 2012", "BMW ActiveHybrid 5 Sedan 2012",
    "BMW 1 Series Convertible 2012", "BMW 1 Series Coupe 2012", "BMW 3 Series Sedan 2012",
    "BMW 3 Series Wagon 2012", "BMW 6 Series Convertible 2007", "BMW X5 SUV 2007",
    "BMW X6 SUV 2012", "BMW M3 Coupe 2012", "BMW M5 Sedan 2010", "BMW M6 Convertible 2010",
    "BMW X3 SUV 2012", "BMW Z4 Convertible 2012",
    "Bentley Continental Supersports Conv. Convertible 2012", "Bentley Arnage Sedan 2009",
    "Bentley Mulsanne Sedan 2011", "Bentley Continental GT Coupe 2012",
    "Bentley Continental GT Coupe 2007", "Bentley Continental Flying Spur Sedan 2007",
    "Bugatti Veyron 16.4 Convertible 2009", "Bugatti Veyron 16.4 Coupe 2009",
    "Buick Regal GS 2012", "Buick Rainier SUV 2007", "Buick Verano Sedan 2012",
    "Buick Enclave SUV 2012", "Cadillac CTS-V Sedan 2012", "Cadillac SRX SUV 2012",
    "Cadillac Escalade EXT Crew Cab 2007", "Chevrolet Silverado 1500 Hybrid Crew Cab 2012",
    "Chevrolet Corvette Convertible 2012", "Chevrolet Corvette ZR1 2012",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007", "Chevrolet Traverse SUV 2012",
    "Chevrolet Camaro Convertible 2012", "Chevrolet HHR SS 2010",
    "Chevrolet Impala Sedan 2007", "Chevrolet Tahoe Hybrid SUV 2012",
    "Chevrolet Sonic Sedan 2012", "Chevrolet Express Cargo Van 2007",
    "Chevrolet Avalanche Crew Cab 2012", "Chevrolet Cobalt SS 2010",
    "Chevrolet Malibu Hybrid Sedan 2010", "Chevrolet TrailBlazer SS 2009",
    "Chevrolet Silverado 2500HD Regular Cab 2012",
    "Chevrolet Silverado 1500 Classic Extended Cab 2007", "Chevrolet Express Van 2007",
    "Chevrolet Monte Carlo Coupe 2007", "Chevrolet Malibu Sedan 2007",
    "Chevrolet Silverado 1500 Extended Cab 2012", "Chevrolet Silverado 1500 Regular Cab 2012",
    "Chrysler Aspen SUV 2009", "Chrysler Sebring Convertible 2010",
    "Chrysler Town and Country Minivan 2012", "Chrysler 300 SRT-8 2010",
    "Chrysler Crossfire Convertible 2008", "Chrysler PT Cruiser Convertible 2008",
    "Daewoo Nubira Wagon 2002", "Dodge Caliber Wagon 2012", "Dodge Caliber Wagon 2007",
    "Dodge Caravan Minivan 1997", "Dodge Ram Pickup 3500 Crew Cab 2010",
    "Dodge Ram Pickup 3500 Quad Cab 2009", "Dodge Sprinter Cargo Van 2009",
    "Dodge Journey SUV 2012", "Dodge Dakota Crew Cab 2010", "Dodge Dakota Club Cab 2007",
    "Dodge Magnum Wagon 2008", "Dodge Challenger SRT8 2011", "Dodge Durango SUV 2012",
    "Dodge Durango SUV 2007", "Dodge Charger Sedan 2012", "Dodge Charger SRT-8 2009",
    "Eagle Talon Hatchback 1998", "FIAT 500 Abarth 2012", "FIAT 500 Convertible 2012",
    "Ferrari FF Coupe 2012", "Ferrari California Convertible 2012",
    "Ferrari 458 Italia Convertible 2012", "Ferrari 458 Italia Coupe 2012",
    "Fisker Karma Sedan 2012", "Ford F-450 Super Duty Crew Cab 2012",
    "Ford Mustang Convertible 2007", "Ford Freestar Minivan 2007",
    "Ford Expedition EL SUV 2009", "Ford Edge SUV 2012", "Ford Ranger SuperCab 2011",
    "Ford GT Coupe 2006", "Ford F-150 Regular Cab 2012", "Ford F-150 Regular Cab 2007",
    "Ford Focus Sedan 2007", "Ford E-Series Wagon Van 2012", "Ford Fiesta Sedan 2012",
    "GMC Terrain SUV 2012", "GMC Savana Van 2012", "GMC Yukon Hybrid SUV 2012",
    "GMC Acadia SUV 2012", "GMC Canyon Extended Cab 2012", "Geo Metro Convertible 1993",
    "HUMMER H3T Crew Cab 2010", "HUMMER H2 SUT Crew Cab 2009", "Honda Odyssey Minivan 2012",
    "Honda Odyssey Minivan 2007", "Honda Accord Coupe 2012", "Honda Accord Sedan 2012",
    "Hyundai Veloster Hatchback 2012", "Hyundai Santa Fe SUV 2012",
    "Hyundai Tucson SUV 2012", "Hyundai Veracruz SUV 2012",
    "Hyundai Sonata Hybrid Sedan 2012", "Hyundai Elantra Sedan 2007",
    "Hyundai Accent Sedan 2012", "Hyundai Genesis Sedan 2012", "Hyundai Sonata Sedan 2012",
    "Hyundai Elantra Touring Hatchback 2012", "Hyundai Azera Sedan 2012",
    "Infiniti G Coupe IPL 2012", "Infiniti QX56 SUV 2011", "Isuzu Ascender SUV 2008",
    "Jaguar XK XKR 2012", "Jeep Patriot SUV 2012", "Jeep Wrangler SUV 2012",
    "Jeep Liberty SUV 2012", "Jeep Grand Cherokee SUV 2012", "Jeep Compass SUV 2012",
    "Lamborghini Reventon Coupe 2008", "Lamborghini Aventador Coupe 2012",
    "Lamborghini Gallardo LP 570-4 Superleggera 2012", "Lamborghini Diablo Coupe 2001",
    "Land Rover Range Rover SUV 2012", "Land Rover LR2 SUV 2012",
    "Lincoln Town Car Sedan 2011", "MINI Cooper Roadster Convertible 2012",
    "Maybach Landaulet Convertible 2012", "Mazda Tribute SUV 2011",
    "McLaren MP4-12C Coupe 2012", "Mercedes-Benz 300-Class Convertible 1993",
    "Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz SL-Class Coupe 2009",
    "Mercedes-Benz E-Class Sedan 2012", "Mercedes-Benz S-Class Sedan 2012",
    "Mercedes-Benz Sprinter Van 2012", "Mitsubishi Lancer Sedan 2012",
    "Nissan Leaf Hatchback 2012", "Nissan NV Passenger Van 2012",
    "Nissan Juke Hatchback 2012", "Nissan 240SX Coupe 1998", "Plymouth Neon Coupe 1999",
    "Porsche Panamera Sedan 2012", "Ram C/V Cargo Van Minivan 2012",
    "Rolls-Royce Phantom Drophead Coupe Convertible 2012", "Rolls-Royce Ghost Sedan 2012",
    "Rolls-Royce Phantom Sedan 2012", "Scion xD Hatchback 2012", "Spyker C8 Convertible 2009",
    "Spyker C8 Coupe 2009", "Suzuki Aerio Sedan 2007", "Suzuki Kizashi Sedan 2012",
    "Suzuki SX4 Hatchback 2012", "Suzuki SX4 Sedan 2012", "Tesla Model S Sedan 2012",
    "Toyota Sequoia SUV 2012", "Toyota Camry Sedan 2012", "Toyota Corolla Sedan 2012",
    "Toyota 4Runner SUV 2012", "Volkswagen Golf Hatchback 2012",
    "Volkswagen Golf Hatchback 1991", "Volkswagen Beetle Hatchback 2012",
    "Volvo C30 Hatchback 2012", "Volvo 240 Sedan 1993", "Volvo XC90 SUV 2007",
    "smart fortwo Convertible 2012",
)

_RESISC45 = (
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge",
    "chaparral", "church", "circular farmland", "cloud", "commercial area",
    "dense residential", "desert", "forest", "freeway", "golf course", "ground track field",
    "harbor", "industrial area", "intersection", "island", "lake", "meadow",
    "medium residential", "mobile home park", "mountain", "overpass", "palace", "parking lot",
    "railway", "railway station", "rectangular farmland", "river", "roundabout", "runway",
    "sea ice", "ship", "snowberg", "sparse residential", "stadium", "storage tank",
    "tennis court", "terrace", "thermal power station", "wetland",
)

# task_vectors renames EuroSAT's folders (sorted) to these prompts-friendly names.
_EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)
_EUROSAT = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)

_GTSRB = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

_DTD = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly",
    "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined",
    "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated",
    "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled",
    "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
)

_T_CARS = (
    "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
    "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
    "a photo of my old {}.",
)
_T_DTD = (
    "a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
    "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
    "a photo of the {} thing.", "a photo of the {} object.",
)
_T_EUROSAT = (
    "a centered satellite photo of {}.", "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)
_T_GTSRB = (
    'a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)
_T_DIGITS = ('a photo of the number: "{}".',)
_T_RESISC45 = (
    "satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.",
    "aerial photo of {}.", "satellite view of {}.", "aerial view of {}.",
    "satellite imagery of a {}.", "aerial imagery of a {}.", "satellite photo of a {}.",
    "aerial photo of a {}.", "satellite view of a {}.", "aerial view of a {}.",
    "satellite imagery of the {}.", "aerial imagery of the {}.", "satellite photo of the {}.",
    "aerial photo of the {}.", "satellite view of the {}.", "aerial view of the {}.",
)
_T_SUN397 = ("a photo of a {}.", "a photo of the {}.")


@dataclass(frozen=True)
class _Spec:
    """What identifies one of the eight tasks on disk and in prompts."""

    name: str  # registry name
    title: str  # task_vectors dataset name (``head_<title>.pt``, ``<title>Val``)
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    dirs: tuple[str, ...]  # folder names under data_root, tried in order, case-insensitive
    folder_names: tuple[str, ...] = ()  # the dataset's own class-folder names, canonical order
    letter_prefixed: bool = False  # SUN397 exports name folders ``a_abbey``
    native: tuple[str, ...] = ()  # native layouts (keys of _NATIVE)


SPECS: dict[str, _Spec] = {
    s.name: s
    for s in (
        _Spec("sun397", "SUN397", _SUN397, _T_SUN397, ("sun397",), letter_prefixed=True),
        _Spec("cars", "Cars", _CARS, _T_CARS,
              ("cars", "stanford_cars", "stanford_cars_folder_based"), native=("cars",)),
        _Spec("resisc45", "RESISC45", _RESISC45, _T_RESISC45, ("resisc45",), native=("resisc45",)),
        _Spec("eurosat", "EuroSAT", _EUROSAT, _T_EUROSAT, ("eurosat", "eurosat_splits"),
              folder_names=_EUROSAT_FOLDERS),
        _Spec("svhn", "SVHN", _DIGITS, _T_DIGITS, ("svhn",), native=("svhn",)),
        _Spec("gtsrb", "GTSRB", _GTSRB, _T_GTSRB, ("gtsrb",), native=("gtsrb",)),
        _Spec("mnist", "MNIST", _DIGITS, _T_DIGITS, ("mnist",), native=("mnist",)),
        _Spec("dtd", "DTD", _DTD, _T_DTD, ("dtd",)),
    )
}


def _norm(name: str) -> str:
    """Name key that ignores case and separators, so ``baseball_diamond`` == ``baseball diamond``."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


# ---------------------------------------------------------------------------------------------
# Preprocessing and datasets
# ---------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def clip_preprocess(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation transform: resize (bicubic), center crop, RGB, tensor, CLIP norm."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


class _FileSource:
    """Image paths and labels of one split; images are decoded lazily."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        """The decoded image; a file that cannot be read or decoded is named (PIL's message for
        a truncated file names none, and 100k files hide one broken one well)."""
        try:
            with open(self.paths[i], "rb") as fh:
                return Image.open(fh).convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all three
            raise TaskDataError(f"cannot read image {self.paths[i]}: {exc}") from exc

    def digest(self, root: Path) -> str:
        """Which files, under which labels: renamed, added, removed or relabelled images change
        it. Files are listed, not read or stat'ed (a network filesystem holds 100k of them)."""
        h = hashlib.blake2b(digest_size=16)
        for path, label in zip(self.paths, self.labels.tolist()):
            h.update(f"{os.path.relpath(path, root)}\0{label}\n".encode())
        return h.hexdigest()


class _ArraySource:
    """uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` held in memory (MNIST, SVHN)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])  # 2-D -> "L", [H, W, 3] -> "RGB"

    def digest(self, root: Path) -> str:
        """Every pixel and label (the arrays are in memory already)."""
        h = hashlib.blake2b(digest_size=16)
        images = np.ascontiguousarray(self.images)
        h.update(f"{images.dtype}{images.shape}".encode())
        h.update(memoryview(images).cast("B"))
        return h.hexdigest() + tensors_digest([self.labels])


class Vision8Dataset(Dataset):
    """``(preprocessed image [3, H, W], label)`` for a subset of one source."""

    def __init__(self, source: _FileSource | _ArraySource, indices: Sequence[int] | None, transform: Callable):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.transform = transform
        self.labels = source.labels[torch.as_tensor(self.indices, dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.source.image(j)), int(self.source.labels[j])


# ---------------------------------------------------------------------------------------------
# Locating data on disk
# ---------------------------------------------------------------------------------------------


def _child(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (exact spelling preferred)."""
    exact = parent / name
    if exact.exists():
        return exact
    if not parent.is_dir():
        return None
    hits = sorted(p for p in parent.iterdir() if p.name.lower() == name.lower())
    return hits[0] if hits else None


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _match_classes(spec: _Spec, folders: Sequence[str], where: Path) -> dict[str, int]:
    """Folder name -> label, by name when every folder matches, else by sorted position."""
    n = len(spec.classnames)
    if len(folders) != n:
        raise TaskDataError(
            f"task {spec.name!r}: {where} has {len(folders)} class folders but the task has "
            f"{n} classes"
        )
    keys: dict[str, int] = {}
    for i, c in enumerate(spec.classnames):
        keys.setdefault(_norm(c), i)
    for i, c in enumerate(spec.folder_names):
        keys.setdefault(_norm(c), i)
    by_name = {}
    for f in folders:
        label = keys.get(_norm(f))
        if label is None and spec.letter_prefixed and re.match(r"^[a-z]_", f, re.IGNORECASE):
            label = keys.get(_norm(f[2:]))
        by_name[f] = label
    labels = list(by_name.values())
    if None not in labels and len(set(labels)) == n:
        return by_name  # type: ignore[return-value]
    if any(label is not None for label in labels):
        _refuse_partial_match(spec, by_name, where)
    ordered = sorted(folders, key=lambda f: (_natural_key(f), f))
    return {f: i for i, f in enumerate(ordered)}


def _natural_key(name: str) -> list[str | int]:
    """Digit runs compared as numbers (``class_2`` before ``class_10``; ``7`` before ``10``):
    unpadded class numbers sorted as text would map ``class_10`` onto class 2."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _refuse_partial_match(spec: _Spec, by_name: dict[str, int | None], where: Path) -> None:
    """Folders named after classes, all but some: sorted position would silently relabel the
    named ones too (Cars' and GTSRB's canonical orders are not alphabetical), so name the rest."""
    unmatched = [f for f, label in by_name.items() if label is None]
    seen: dict[int, str] = {}
    twice = []
    for f, label in by_name.items():
        if label is not None and seen.setdefault(label, f) != f:
            twice.append(f"{seen[label]} and {f} are both {spec.classnames[label]!r}")
    problems = [f"{f!r} matches no class" + did_you_mean(f, spec.classnames) for f in unmatched[:5]]
    problems += [f"{len(unmatched) - 5} more folders match no class"] if len(unmatched) > 5 else []
    raise TaskDataError(
        f"task {spec.name!r}: {where} has class folders named after the task's classes, but "
        f"{'; '.join(problems + twice)} (tasks/vision8.py lists the class names; folders "
        f"map by sorted position only when none is named after a class)"
    )


def _folder_split(spec: _Spec, split_dir: Path, is_valid_file: Callable[[str], bool] | None = None,
                  mapping: dict[str, int] | None = None) -> _FileSource:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if mapping is None:
        mapping = _match_classes(spec, _class_dirs(split_dir), split_dir)
    samples = make_dataset(
        str(split_dir), mapping,
        extensions=None if is_valid_file else IMG_EXTENSIONS,
        is_valid_file=is_valid_file, allow_empty=True,
    )
    return _FileSource([p for p, _ in samples], [y for _, y in samples])


def _imagefolder(spec: _Spec, root: Path) -> tuple[str, _FileSource, _FileSource] | None:
    for name in spec.dirs:
        base = _child(root, name)
        if base is None or not base.is_dir():
            continue
        train = _child(base, "train")
        if train is None or not train.is_dir():
            continue
        test = _child(base, "test")
        if test is None or not test.is_dir():
            test = _child(base, "val")
        if test is None or not test.is_dir():
            raise TaskDataError(
                f"task {spec.name!r}: found {train} but neither {base / 'test'} nor {base / 'val'} "
                "(ImageFolder layout needs <dir>/train/<class>/* and <dir>/test/<class>/*)"
            )
        train_dirs, test_dirs = _class_dirs(train), _class_dirs(test)
        if train_dirs != test_dirs:  # mapped apart, the same folder name could get two labels
            only_train = sorted(set(train_dirs) - set(test_dirs))
            only_test = sorted(set(test_dirs) - set(train_dirs))
            raise TaskDataError(
                f"task {spec.name!r}: the class folders of {test} differ from those of {train} "
                f"(only in {train.name}: {', '.join(only_train) or '-'}; only in {test.name}: "
                f"{', '.join(only_test) or '-'})"
            )
        mapping = _match_classes(spec, train_dirs, train)
        return f"imagefolder:{base.name}", _folder_split(spec, train, mapping=mapping), _folder_split(spec, test, mapping=mapping)
    return None


def _require(path: Path | None, what: str, spec: _Spec) -> Path:
    if path is None or not path.exists():
        raise TaskDataError(f"task {spec.name!r}: missing {what}")
    return path


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): zero, zero, dtype 0x08 (uint8), ndim, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TaskDataError(f"{path}: not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise TaskDataError(f"{path}: IDX header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _loadmat(spec: _Spec, path: Path, keys: tuple[str, ...], **options: Any) -> dict[str, Any]:
    """A MATLAB file's variables, ``keys`` required: a truncated, HDF5 (v7.3) or other file is one
    error naming it (scipy's own errors name neither the file nor the variable)."""
    import scipy.io as sio

    try:
        mat = sio.loadmat(str(path), **options)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise TaskDataError(f"task {spec.name!r}: {path}: not a readable MATLAB file ({type(exc).__name__}: "
                            f"{exc})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise TaskDataError(f"task {spec.name!r}: {path}: holds no {' or '.join(map(repr, missing))} (its variables: "
                            f"{', '.join(found) or 'none'})")
    return mat


def _native_mnist(spec: _Spec, root: Path):
    base = _child(root, "mnist")
    raw = _child(base, "raw") if base is not None else None
    if raw is None or not raw.is_dir():
        return None

    def part(prefix: str) -> _ArraySource:
        arrays = []
        for kind in ("images-idx3", "labels-idx1"):
            stem = f"{prefix}-{kind}-ubyte"
            path = _child(raw, stem) or _child(raw, stem + ".gz")
            arrays.append(_read_idx(_require(path, f"{raw / stem} (or {stem}.gz)", spec)))
        images, labels = arrays
        if len(images) != len(labels):
            raise TaskDataError(f"task {spec.name!r}: {raw}/{prefix}-*: {len(images)} images but {len(labels)} labels")
        return _ArraySource(images, labels)

    return f"mnist-idx:{raw}", part("train"), part("t10k")


def _native_svhn(spec: _Spec, root: Path):
    base = _child(root, "svhn")
    if base is None or not (_child(base, "train_32x32.mat") or _child(base, "test_32x32.mat")):
        return None

    def part(split: str) -> _ArraySource:
        path = _require(_child(base, f"{split}_32x32.mat"), str(base / f"{split}_32x32.mat"), spec)
        mat = _loadmat(spec, path, ("X", "y"))
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)).astype(np.uint8))
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0  # SVHN stores digit 0 as 10
        return _ArraySource(images, labels)

    return f"svhn-mat:{base}", part("train"), part("test")


def _native_gtsrb(spec: _Spec, root: Path):
    base = _child(root, "gtsrb")
    inner = _child(base, "GTSRB") if base is not None else None
    train = _child(inner, "Training") if inner is not None else None
    if train is None or not train.is_dir():
        return None
    train_src = _folder_split(spec, train, lambda p: p.lower().endswith(".ppm"))
    images = _require(_child(_child(inner, "Final_Test") or inner / "Final_Test", "Images"),
                      str(inner / "Final_Test" / "Images"), spec)
    csv_path = _require(_child(base, "GT-final_test.csv"), str(base / "GT-final_test.csv"), spec)
    test_src = _gtsrb_test_list(spec, csv_path, images)
    return f"gtsrb-native:{base}", train_src, test_src


def _gtsrb_test_list(spec: _Spec, csv_path: Path, images: Path) -> _FileSource:
    """The test images and labels GT-final_test.csv lists (``;``-separated, ``Filename`` and
    ``ClassId`` columns): another file under that name is one error naming it, not a KeyError."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=";", skipinitialspace=True)
        missing = [c for c in ("Filename", "ClassId") if c not in (reader.fieldnames or ())]
        if missing:
            raise TaskDataError(f"task {spec.name!r}: {csv_path}: no column {' or '.join(map(repr, missing))} "
                                f"(its header: {';'.join(reader.fieldnames or ()) or 'none'}; the labelled "
                                "GT-final_test.csv, ';'-separated, is needed)")
        rows = list(reader)
    try:
        labels = [int(r["ClassId"]) for r in rows]
    except (TypeError, ValueError):
        bad = next(r for r in rows if not str(r["ClassId"]).strip().isdigit())
        raise TaskDataError(f"task {spec.name!r}: {csv_path}: ClassId {bad['ClassId']!r} of {bad['Filename']} "
                            "is not a class number") from None
    return _FileSource([str(images / r["Filename"]) for r in rows], labels)


def _native_cars(spec: _Spec, root: Path):
    base = _child(root, "stanford_cars")
    devkit = _child(base, "devkit") if base is not None else None
    if devkit is None or not devkit.is_dir():
        return None

    def part(split: str, annos: Path | None, folder: str) -> _FileSource:
        annos = _require(annos, f"annotations for {split} ({devkit / f'cars_{split}_annos*.mat'})", spec)
        images = _require(_child(base, folder), str(base / folder), spec)
        records = np.atleast_1d(_loadmat(spec, annos, ("annotations",), squeeze_me=True)["annotations"])
        if not set(getattr(records.dtype, "names", None) or ()) >= {"fname", "class"}:
            raise TaskDataError(f"task {spec.name!r}: {annos}: 'annotations' has no 'fname' and 'class' fields "
                                "(the test annotations without labels? use cars_test_annos_withlabels.mat)")
        paths = [str(images / str(r["fname"])) for r in records]
        return _FileSource(paths, [int(r["class"]) - 1 for r in records])  # ids are 1-based

    meta = _child(devkit, "cars_meta.mat")
    if meta is not None:
        names = _loadmat(spec, meta, ("class_names",), squeeze_me=True)["class_names"].tolist()
        if len(names) != len(spec.classnames):
            raise TaskDataError(
                f"task {spec.name!r}: {meta} lists {len(names)} classes but the task has "
                f"{len(spec.classnames)} classes"
            )
    test_annos = _child(base, "cars_test_annos_withlabels.mat") or _child(devkit, "cars_test_annos_withlabels.mat")
    return (
        f"stanford-cars-devkit:{base}",
        part("train", _child(devkit, "cars_train_annos.mat"), "cars_train"),
        part("test", test_annos, "cars_test"),
    )


def _native_resisc45(spec: _Spec, root: Path):
    base = _child(root, "resisc45")
    images = _child(base, "NWPU-RESISC45") if base is not None else None
    if images is None or not images.is_dir():
        return None

    def part(split: str) -> _FileSource:
        path = _require(_child(base, f"resisc45-{split}.txt"), str(base / f"resisc45-{split}.txt"), spec)
        names = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        source = _folder_split(spec, images, lambda p: os.path.basename(p) in names)
        missing = sorted(names - {os.path.basename(p) for p in source.paths})
        if missing:  # else the split would silently be a subset of the published one
            raise TaskDataError(
                f"task {spec.name!r}: {path} lists {len(missing)} of its {len(names)} images that are not "
                f"in any class folder of {images} (first: {missing[0]}); is the extraction incomplete?"
            )
        return source

    return f"resisc45-lists:{base}", part("train"), part("test")


_NATIVE = {
    "mnist": (_native_mnist, "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
    "svhn": (_native_svhn, "<root>/svhn/{train,test}_32x32.mat"),
    "gtsrb": (_native_gtsrb, "<root>/gtsrb/GTSRB/Training/<class>/*.ppm + <root>/gtsrb/GTSRB/Final_Test/"
                             "Images/*.ppm + <root>/gtsrb/GT-final_test.csv"),
    "cars": (_native_cars, "<root>/stanford_cars/{devkit/cars_train_annos.mat,cars_train/,"
                           "cars_test_annos_withlabels.mat,cars_test/}"),
    "resisc45": (_native_resisc45, "<root>/resisc45/NWPU-RESISC45/<class>/* + "
                                   "<root>/resisc45/resisc45-{train,test}.txt"),
}


def _locate(spec: _Spec, root: Path):
    found = _imagefolder(spec, root)
    for key in spec.native:
        if found is None:
            found = _NATIVE[key][0](spec, root)
    if found is None:
        others = f", or named {' or '.join(spec.dirs[1:])}" if spec.dirs[1:] else ""
        expected = [f"<root>/{spec.dirs[0]}/{{train,test}}/<class>/<image> (ImageFolder; the folder in any "
                    f"case{others})"]
        expected += [_NATIVE[k][1] for k in spec.native]
        raise TaskDataError(
            f"task {spec.name!r}: no data under {root}; expected " + " or ".join(expected)
        )
    return found


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class Vision8Task(Task):
    """One of the eight benchmark tasks, read from ``data_root`` (see the module docstring)."""

    def __init__(
        self,
        spec: _Spec,
        data_root: str | os.PathLike,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        image_size: int = 224,
        val_fraction: float = 0.1,
        val_cap: int = 5000,
    ):
        self.spec = spec
        self.name = spec.name
        self.classnames = list(spec.classnames)
        self.templates = list(spec.templates)
        if not 0.0 < val_fraction < 1.0:
            raise TaskDataError(f"task {spec.name!r}: val_fraction must be in (0, 1), got {val_fraction}")
        if val_cap < 1:
            raise TaskDataError(f"task {spec.name!r}: val_cap must be >= 1, got {val_cap}")
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise TaskDataError(f"task {spec.name!r}: data_root {root} does not exist or is not a folder")
        self.root = root
        self.layout, train, test = _locate(spec, root)
        self._custom_preprocess = preprocess is not None
        self.preprocess = preprocess if preprocess is not None else clip_preprocess(image_size)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.val_cap = val_cap

        n_cls = len(self.classnames)
        for split, src in (("train", train), ("test", test)):
            if len(src) == 0:
                raise TaskDataError(f"task {spec.name!r}: split {split!r} is empty ({self.layout})")
            lo, hi = int(src.labels.min()), int(src.labels.max())
            if lo < 0 or hi >= n_cls:
                raise TaskDataError(
                    f"task {spec.name!r}: split {split!r} has labels in [{lo}, {hi}] but the task "
                    f"has {n_cls} classes"
                )
        n = len(train)
        n_val = min(int(n * val_fraction), val_cap)
        if n_val <= 0 or n_val >= n:
            raise TaskDataError(
                f"task {spec.name!r}: split 'val' would be empty: {n} train images with "
                f"val_fraction={val_fraction} give {n_val} validation images"
            )
        # Same call as task_vectors' split_train_into_train_val, hence the same indices.
        tr, va = torch.utils.data.random_split(
            range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(VAL_SEED)
        )
        self._sources = {"train": train, "val": train, "test": test}
        self._indices: dict[str, list[int] | None] = {
            "train": list(tr.indices), "val": list(va.indices), "test": None,
        }
        self._datasets: dict[str, Vision8Dataset] = {}

    def dataset(self, split: str) -> Vision8Dataset:
        if split not in SPLITS:
            raise TaskDataError(f"task {self.name!r} has no split {split!r} (splits: {', '.join(SPLITS)})")
        if split not in self._datasets:
            self._datasets[split] = Vision8Dataset(self._sources[split], self._indices[split], self.preprocess)
        return self._datasets[split]

    def labels(self, split: str) -> torch.Tensor:
        """Labels of a split without decoding any image."""
        return self.dataset(split).labels

    def indices(self, split: str) -> list[int]:
        """Positions of a split's samples in its source (train and val share the train source)."""
        return list(self.dataset(split).indices)

    @cached_property
    def _data_digest(self) -> dict[str, str]:
        return {s: self._sources[s].digest(self.root) for s in ("train", "test")}

    def identity(self) -> dict[str, Any]:
        """The files (relative to ``data_root``) and labels, not where they lie: a dataset copied
        to node-local scratch or another mount reuses the results cached for it."""
        return {
            **super().identity(),
            "layout": relative_layout(self.layout, self.root),
            "sizes": {s: len(self.dataset(s)) for s in SPLITS},
            "data": self._data_digest,
            "val": {"fraction": self.val_fraction, "cap": self.val_cap, "seed": VAL_SEED},
            "preprocess": preprocess_identity(self.preprocess) if self._custom_preprocess else f"clip:{self.image_size}",
        }


def relative_layout(layout: str, root: Path) -> str:
    """``layout`` with the folder it names relative to ``root``: the native layouts name where they
    found their files (``mnist-idx:/data/MNIST/raw``, in error messages), which a key must not hold,
    or the same data copied to node-local scratch would run every job again."""
    kind, sep, where = layout.partition(":")
    folder = Path(where)
    return f"{kind}{sep}{folder.relative_to(root)}" if sep and folder.is_relative_to(root) else layout


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def preprocess_identity(preprocess: Callable[[Image.Image], torch.Tensor]) -> str:
    """A preprocess of one's own as a task's identity holds it: its ``repr`` (a torchvision
    ``Compose`` lists its steps), where that names no memory address; else (a function, a lambda,
    an object without a ``repr`` of its own) its qualified name and the sha256 of its source and
    of the values it holds (closure, defaults; an object's attributes), so the same code in a
    later process reuses the cached results, which an address never would."""
    text = repr(preprocess)
    if not _ADDRESS.search(text):
        return text
    if inspect.isfunction(preprocess) or inspect.ismethod(preprocess):  # its code and the values it closes over
        fn = getattr(preprocess, "__func__", preprocess)
        cells = [c.cell_contents for c in fn.__closure__ or ()]
        code, state = preprocess, _ADDRESS.sub("", repr((cells, fn.__defaults__, fn.__kwdefaults__)))
    else:  # an object: its class's code and its attributes
        code, state = type(preprocess), _ADDRESS.sub("", repr(sorted(getattr(preprocess, "__dict__", {}).items())))
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):  # defined where no source is kept (an interactive session)
        source = _ADDRESS.sub("", text)
    digest = hashlib.sha256((source + state).encode()).hexdigest()[:16]
    return f"{code.__module__}.{code.__qualname__} sha256:{digest}"


def _build(name: str, data_root: str, preprocess, image_size: int, val_fraction: float, val_cap: int) -> Vision8Task:
    return Vision8Task(SPECS[name], data_root, preprocess, image_size, val_fraction, val_cap)


DESCRIPTIONS = {
    "sun397": "SUN397 scenes (397 classes)", "cars": "Stanford Cars (196 classes)",
    "resisc45": "RESISC45 remote sensing scenes (45 classes)", "eurosat": "EuroSAT land use (10 classes)",
    "svhn": "SVHN house-number digits (10 classes)", "gtsrb": "GTSRB traffic signs (43 classes)",
    "mnist": "MNIST digits (10 classes)", "dtd": "DTD textures (47 classes)",
}


def _factory(name: str):
    """The registered factory of one task (an explicit signature: the Workspace fills data_root
    and image_size from the sweep)."""

    def factory(data_root: str, preprocess=None, image_size: Annotated[int, Field(ge=1)] = 224,
                val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1,
                val_cap: Annotated[int, Field(ge=1)] = 5000) -> Vision8Task:
        return _build(name, data_root, preprocess, image_size, val_fraction, val_cap)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{DESCRIPTIONS[name]} from a local data_root."
    return factory


for _name in SPECS:
    globals()[_name] = register_task(_name, f"{DESCRIPTIONS[_name]} from a local data_root")(_factory(_name))
